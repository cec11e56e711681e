# The fan-out phase's long-lived Salt API client (driven by bench/src/fanout/salt.rs).
#
# argv: the master's config dir. Reads one command per line on stdin and answers each with one
# JSON line on stdout:
#   ping ID,ID,…   -> {"answered": [ids whose test.ping returned True]}
#   run ID,ID,…    -> {"ms": elapsed, "returned": {id: output}} for cmd.run 'echo hi' on them
# The timing is taken inside this process around LocalClient.cmd alone, so it holds Salt's
# publish, the minions' work and their returns, not this pipe.
import json
import os
import sys
import time

import salt.client

client = salt.client.LocalClient(c_path=os.path.join(sys.argv[1], "master"))
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    verb, _, ids = line.strip().partition(" ")
    targets = [target for target in ids.split(",") if target]
    try:
        if verb == "ping":
            returned = client.cmd(targets, "test.ping", tgt_type="list", timeout=5)
            answered = sorted(m for m, value in returned.items() if value is True)
            print(json.dumps({"answered": answered}), flush=True)
        elif verb == "run":
            started = time.perf_counter()
            returned = client.cmd(targets, "cmd.run", ["echo hi"], tgt_type="list", timeout=30)
            elapsed = (time.perf_counter() - started) * 1e3
            print(json.dumps({"ms": elapsed, "returned": returned}), flush=True)
        else:
            print(json.dumps({"error": "unknown command %r" % verb}), flush=True)
    except Exception as error:  # reported to the benchmark, which fails the phase
        print(json.dumps({"error": "%s: %s" % (type(error).__name__, error)}), flush=True)
