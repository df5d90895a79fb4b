#!/usr/bin/env python3
"""Benchmark helper: run several MetaStack agents in one Python process.

    python bench/agents_host.py INI [INI ...]

Each ini is an ordinary agent configuration (``metastack.load_config``);
each agent is a ``metastack.Agent`` whose ``run()`` loop runs in its own
thread, named after its node. This is how bench/scale.py fits 200 nodes on
one small machine: only the process count changes, every agent still has
its own etcd client, lease, watch and libvirt connection.

What it does differently from ``metastack.main()``, on purpose:
  * one log for the whole process (stderr), each line tagged with the
    thread name; the agent's own lines (claims, lost races) come from its
    run() thread, which is named after the node. metastack logs through one
    module-level logger, so per-agent log files are not possible here.
  * no watchdog: only ``test:`` libvirt URIs are accepted, for which
    ``Agent.__init__`` creates no WatchdogFeed (test:/// domains live and
    die with this process), so no watchdog process is ever spawned.
  * SIGTERM/SIGINT ask every agent to stop (``request_stop``); the process
    exits once every run() has returned. Exit codes follow metastack's: 2
    for a bad ini, 1 if any agent failed to start or died.
"""
from __future__ import annotations

import faulthandler
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metastack as ms  # noqa: E402

log = logging.getLogger("metastack.agents_host")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        configs = [ms.load_config(path) for path in argv]
    except ms.ConfigError as exc:
        print(f"agents_host: configuration error: {exc}", file=sys.stderr)
        return 2
    foreign = [c.node_name for c in configs if not c.libvirt_uri.startswith("test:")]
    if foreign:
        print(f"agents_host: only test: libvirt URIs (no watchdog here); not: {', '.join(foreign)}",
              file=sys.stderr)
        return 2
    root = logging.getLogger()
    root.setLevel(configs[0].log_level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(levelname)s %(message)s"))
    root.addHandler(handler)

    agents = []
    for cfg in configs:
        try:
            agents.append(ms.Agent(cfg))
        except (ms.HypervisorError, ms.StoreUnavailable, ms.ConfigError) as exc:
            log.error("%s cannot start: %s", cfg.node_name, exc)
            for a in agents:
                a.store.close()
            return 1
    failed: list[str] = []

    def run(agent: ms.Agent) -> None:
        try:
            agent.run()
        except Exception as exc:  # noqa: BLE001 - one agent's failure is reported, the others go on
            log.error("agent %s stopped: %s", agent.node, exc)
            failed.append(agent.node)

    def on_signal(_signum: int, _frame: Any) -> None:
        for a in agents:
            a.request_stop()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    threads = [threading.Thread(target=run, args=(a,), name=a.node) for a in agents]
    for t in threads:
        t.start()
    log.info("running %d agents: %s", len(agents), " ".join(a.node for a in agents))
    for t in threads:
        while t.is_alive():
            t.join(0.5)  # short joins: the main thread must stay free for signals
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
