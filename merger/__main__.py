"""`python -m merger ...`: the command line (:mod:`merger.cli`), started with its imports frozen.

torch, transformers' configs and the Hub client create some 400,000 objects on import that live until
exit. The cyclic garbage collector would walk all of them several times while they are imported and
once more as the interpreter shuts down: 0.5–0.7 s of a 3–4 s merge on this project's 2-core machines
(docs/decisions.md, "Starting and ending the CLI"). So the collector is off while the CLI imports (the
command line imports torch only once it has read the config: see :mod:`merger.cli`), those objects are
then frozen out of its reach (`gc.freeze`), and it runs as usual for the work. Only this entry point
does so: importing :mod:`merger.cli` and calling its `main` (tests, other programs) changes nothing.
"""

import gc
import sys

gc.disable()  # until the command's imports are done: `main(freeze_imports=True)` turns it back on
from merger.cli import main  # noqa: E402  (imported with the collector off, see above)

sys.exit(main(freeze_imports=True))
