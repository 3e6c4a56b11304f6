"""Shared helpers of the Python measurement scripts in bench/: start a release gateway on
free ports, mint development tokens, read a process's CPU time and memory from /proc.
Standard library only."""
import functools
import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import tempfile
import time

# The gateway's public development secret (crates/gateway/src/auth.rs, DEV_SECRET).
DEV_SECRET = b"imgate-development-secret-do-not-use-in-production"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def release_dir():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(__file__), "..", "target"))
    return os.path.join(target, "release")


def default_binary():
    """`IMGATE_BIN`, else the release build: the rule imgate-harness follows for Rust."""
    return os.environ.get("IMGATE_BIN") or os.path.join(release_dir(), "imgate")


def _b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def token(uid, ttl=3600):
    """An HS256 JWT for uid, signed like `imgate token` does in development mode."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = _b64(json.dumps({"sub": uid, "exp": int(time.time()) + ttl}).encode())
    signing_input = header + b"." + claims
    sig = _b64(hmac.new(DEV_SECRET, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + sig).decode()


@functools.lru_cache(maxsize=None)
def _serve_help(binary):
    return subprocess.run([binary, "serve", "--help"], capture_output=True, text=True).stdout


class Gateway:
    """`imgate serve` on free loopback ports; use as a context manager."""

    def __init__(self, binary, *args):
        # Standalone gateways here keep their store in memory unless told otherwise: what
        # these scripts measure is the gateway, not the disk.
        if "--store" not in args and "--nats" not in args:
            args = ("--store", "memory", *args)
        # Every client here connects from loopback: no per-address limit (older builds,
        # measured for a before/after, do not have the flag).
        if "--max-connections-per-ip" in _serve_help(binary):
            args = ("--max-connections-per-ip", "0", *args)
        # The gateway's log goes to a file, so an exit can be explained afterwards.
        self.log = tempfile.NamedTemporaryFile(prefix="imgate-gw-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [binary, "serve", "--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
        )
        line = self.proc.stdout.readline()
        m = re.search(r"http=(\S+):(\d+) tcp=(\S+):(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"gateway did not start: {line!r}")
        self.http = (m.group(1), int(m.group(2)))
        self.tcp = (m.group(3), int(m.group(4)))
        self.pid = self.proc.pid

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=15)

    def cpu_seconds(self):
        return cpu_seconds(self.pid)

    def rss_kib(self, field="VmRSS"):
        return rss_kib(self.pid, field)


def cpu_seconds(pid):
    """User + system CPU time of a process, from /proc/<pid>/stat (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]
