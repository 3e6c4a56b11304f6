#!/usr/bin/env python3
"""Checks that no gateway log of a test run holds a token the tests used.

tests/run points IMGATE_TEST_LOG_DIR at a fresh directory for the end-to-end tests: every
gateway the harness starts logs (at debug for imgate, info for the libraries) into a file
there, and every token the tests mint, good or forged, is noted in tokens-<pid>.txt. This
script reads both and fails if any token, or the signature part of one, appears in any log.
It also fails when there is too little to check, so it cannot pass by looking at nothing.

    python3 tests/tokens_not_logged.py DIR
"""
import glob
import os
import re
import sys

# A run of base64url characters long enough to be a JWT segment.
RUN = re.compile(rb"[A-Za-z0-9_-]{16,}")


def main(directory):
    tokens = set()
    for path in glob.glob(os.path.join(directory, "tokens-*.txt")):
        with open(path) as f:
            tokens.update(line.strip() for line in f if line.strip())
    logs = sorted(glob.glob(os.path.join(directory, "gateway-*.log")))
    # What a leak could look like: the whole token, or any of its dot-separated parts past
    # the standard header (the payload names the user, the signature is the secret part).
    needles = set()
    for t in tokens:
        parts = t.split(".")
        needles.add(t.encode())
        needles.update(p.encode() for p in parts[1:] if len(p) >= 16)
    scanned = 0
    leaks = []
    for path in logs:
        with open(path, "rb") as f:
            data = f.read()
        scanned += len(data)
        for m in RUN.finditer(data):
            if m.group() in needles:
                line_start = data.rfind(b"\n", 0, m.start()) + 1
                line_end = data.find(b"\n", m.end())
                leaks.append((path, data[line_start:line_end if line_end >= 0 else None][:300]))
        for t in tokens:
            if t.encode() in data:
                leaks.append((path, b"the whole token " + t.encode()[:20] + b"..."))
    print(f"tokens_not_logged: {len(tokens)} tokens, {len(logs)} gateway logs, {scanned:,} bytes scanned")
    if len(tokens) < 100 or len(logs) < 20 or scanned == 0:
        sys.exit("tokens_not_logged: too little to check (is IMGATE_TEST_LOG_DIR reaching the tests?)")
    if leaks:
        for path, line in leaks[:20]:
            print(f"  {os.path.basename(path)}: {line.decode(errors='replace')}", file=sys.stderr)
        sys.exit(f"tokens_not_logged: {len(leaks)} log lines hold a token")


if __name__ == "__main__":
    main(sys.argv[1])
