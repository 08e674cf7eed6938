"""
The state database (L{xcauth.state.database}) shared by processes: several
creating and writing one new file at once.
"""

from __future__ import annotations

import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.harness import childEnv
from xcauth.state import database as store


class SchemaTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()

    def test_concurrentCreation(self) -> None:
        """
        Several processes creating and writing the same new file at once all
        succeed, and the result is one sound database.
        """
        script = (
            "import sys, time\n"
            "from xcauth.state import database as store\n"
            "path, start, n = sys.argv[1], float(sys.argv[2]), sys.argv[3]\n"
            "time.sleep(max(0, start - time.time()))\n"
            "conn = store.connect(path)\n"
            "for i in range(20):\n"
            "    store.putCacheEntry(conn, f'u{n}-{i}@example.org', 'h', time.time())\n"
            "store.addDomain(conn, f'd{n}.org', 'http://x.example/', 's', None)\n"
            "conn.close()\n"
        )
        start = time.time() + 1.0
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, self.path, str(start), str(n)],
                env=childEnv(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for n in range(4)
        ]
        for p in procs:
            out, _ = p.communicate(timeout=60)
            self.assertEqual(p.returncode, 0, out.decode(errors="replace"))
        conn = store.connect(self.path)
        try:
            self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
            self.assertEqual(len(store.listCache(conn)), 80)
            self.assertEqual(len(store.listDomains(conn)), 4)
            self.assertEqual(store.schemaVersion(conn), store.SCHEMA_VERSION)
        finally:
            conn.close()
