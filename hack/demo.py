"""``make demo``: gpuyard's whole story on a local cluster (see docs/demo.md).

    PYTHONPATH=hack .venv/bin/python hack/demo.py [--profile short|standard|long]
        [--keep-cluster] [--out DIR] [--state-dir DIR] [--plain]

The code lives in ``hack/localcluster/demo*.py``, where mypy checks it.
"""

import sys

from localcluster.demo import main

if __name__ == "__main__":
    sys.exit(main())
