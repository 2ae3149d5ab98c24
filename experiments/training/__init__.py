"""experiments/train.py's modules (``experiments`` is not a package: the script puts this
directory's parent on ``sys.path``). What a run says and records is written once, in train.py's
docstring; these modules hold its parts: the config and its checks (``config``, ``validation``,
``processes``), the run's directory (``run_dir``), the network, loss, optimizer and schedule
(``build``), the checks of data and model before compiling (``preflight``), compilation counting
(``compilations``), interrupts and resuming (``interrupts``, ``resuming``), ``fit`` as the
script calls it (``fitting``) and the run's record and final line (``summary``)."""
