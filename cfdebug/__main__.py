import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
    # Under torchrun, after the process group is destroyed (distributed.shutdown): end without the
    # interpreter's finalisation, in which gloo's worker threads could still release tensors and
    # abort the process ("terminate called without an active exception") after its work was
    # written. Every file cfdebug writes is already closed and atomically renamed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
