"""experiments/benchmark.py's modules (``experiments`` is not a package: the script puts this
directory's parent on ``sys.path``). The method is written once, in benchmark.py's docstring."""
