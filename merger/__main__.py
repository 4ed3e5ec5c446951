"""`python -m merger ...`: the command line (:mod:`merger.cli`), started with its imports frozen.

torch, transformers' configs and the Hub client create some 400,000 objects on import that live until
exit. The cyclic garbage collector would walk all of them several times while they are imported and
once more as the interpreter shuts down: 0.5–0.7 s of a 3–4 s merge on this project's 2-core machines
(docs/decisions.md, "Starting and ending the CLI"). So the collector is off while the CLI imports,
those objects are then frozen out of its reach (`gc.freeze`), and it runs as usual for the work.
Only this entry point does so: importing :mod:`merger.cli` (tests, other programs) changes nothing.
"""

import gc
import sys

gc.disable()
from merger.cli import main  # noqa: E402  (imported with the collector off, see above)

gc.freeze()
gc.enable()
sys.exit(main())
