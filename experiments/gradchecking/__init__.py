"""experiments/gradcheck.py's parts (``experiments`` is not a package: the script puts this
directory's parent on ``sys.path``). What the sweep checks, prints and writes is stated once, in
gradcheck.py's docstring; these modules hold its parts: the networks, their inputs and targets,
bug injection and the check of one combination (``networks``), the sweep's grid and its
validation (``grid``), and its header, lines and files (``report``). gradcheck.py keeps ``run``
and ``main`` and re-exports the names it had before they moved."""
