"""One torchrun rank of ``edgecap ARGS`` (test_train_scale): the command, then the names of the
threads still running in the process, printed as one line. The process group's threads must
have ended with the command: left running into the interpreter's exit, gloo's now and then
aborted a rank after a finished run ('terminate called without an active exception')."""

import json
import os
import sys

from edgecap.cli import main

code = main(sys.argv[1:])
tasks = "/proc/self/task"
names = sorted(open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks))
print("threads after the command: " + json.dumps(names), flush=True)
sys.exit(code)
