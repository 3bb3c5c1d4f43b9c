"""saescope's benchmarks: speed and memory of serving and training, as ratios to a baseline.

Each ``bench/serve_*.py`` and ``bench/train_*.py`` writes ``bench/results/<name>.json``;
``bench/report.py`` turns those into the tables of ``BENCHMARKS.md`` and the plots in
``bench/results/``; ``python -m bench.run_all`` (``make bench``) runs everything.
"""
