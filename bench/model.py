#!/usr/bin/env python3
"""The cluster's cost model, fitted to W8 runs (bench/run W8), and its predictions.

  bench/model.py bench/results/w8-<date>.jsonl [--hold-out broadcast:6] [--rate 5000]

Each W8 run is the W1 load (each message from a random user to a random user on another
gateway, both inbox copies stored) with the users spread over G gateways, in one fanout
mode. For every run the generator reports M messages delivered, the copies NATS handed to
the gateways (R, summed over gateways) and the copies the gateways dropped for holding
nobody (D), and the CPU seconds of nats-server and of the gateways over W wall seconds.
The model is linear in those counts:

  nats-server CPU = a * stored copies (2M) + b * copies delivered to gateways (R)
                    + e_mode * gateway-seconds (G*W)
  gateways' CPU   = c * messages (M)       + d * dropped copies (D) + f_mode * gateway-seconds (G*W)

a is what storing and acknowledging a copy costs nats-server, b what handing one copy to
one subscribing gateway costs it, e what each connected gateway costs it per second
(in interest mode that includes the gateway's position checks), c what a message costs the gateways that accept and
deliver it (the send, two deliveries, acks), d what a gateway pays for a copy it drops, and
f what a gateway costs per second whatever it does (timers; in interest mode also the
position checks), fitted per mode. The fit
leaves one run out (--hold-out) and predicts it. Then, per mode, it predicts the CPU per
delivered message at --rate msg/s for G = 16..256:

  broadcast: R = 2M*G, D = 2M*(G-1)       interest: R = 2M, D = 0

and names the smallest G where interest costs less. Pure Python: no numpy needed.
"""
import argparse
import json
import sys


def solve(rows, ys):
    """Least squares: the x minimising |A x - y|, by the normal equations."""
    n = len(rows[0])
    ata = [[sum(r[i] * r[j] for r in rows) for j in range(n)] for i in range(n)]
    aty = [sum(r[i] * y for r, y in zip(rows, ys)) for i in range(n)]
    # Gaussian elimination with partial pivoting.
    m = [ata[i] + [aty[i]] for i in range(n)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        if abs(m[col][col]) < 1e-18:
            raise SystemExit("the runs do not determine the model (a column is all zero)")
        for r in range(n):
            if r != col:
                k = m[r][col] / m[col][col]
                m[r] = [a - k * b for a, b in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


def counts(r):
    gws = r["gateway_processes"]
    return {
        "mode": r.get("fanout", "broadcast"),
        "g": len(gws),
        "m": r["delivered"],
        "received": sum(g["tail_received"] for g in gws),
        "dropped": sum(g["dropped_not_local"] for g in gws),
        "wall": r["wall_seconds"],
        "gw_cpu": sum(g["cpu_seconds"] for g in gws),
        "nats_cpu": r["nats_server"]["cpu_seconds"],
        "bus_bytes": sum(g.get("bus_bytes", 0) for g in gws),
    }


def nats_row(c):
    gs = c["g"] * c["wall"]
    return [2 * c["m"], c["received"], gs if c["mode"] == "broadcast" else 0, gs if c["mode"] == "interest" else 0]


def gw_row(c):
    gs = c["g"] * c["wall"]
    return [c["m"], c["dropped"], gs if c["mode"] == "broadcast" else 0, gs if c["mode"] == "interest" else 0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="a W8 JSON-lines file (one W1 report per line)")
    ap.add_argument("--hold-out", default="broadcast:6", help="MODE:G, the run left out of the fit")
    ap.add_argument("--rate", type=float, default=5000, help="msg/s for the predictions")
    a = ap.parse_args()
    runs = [counts(json.loads(line)) for line in open(a.runs) if line.strip()]
    runs = [c for c in runs if c["m"] > 0]
    mode, g = a.hold_out.split(":")
    held = [c for c in runs if c["mode"] == mode and c["g"] == int(g)]
    fit = [c for c in runs if not (c["mode"] == mode and c["g"] == int(g))]
    if not held or len(fit) < 3:
        raise SystemExit(f"need the held-out run {a.hold_out} and at least three others in {a.runs}")
    na, nb, eb, ei = solve([nats_row(c) for c in fit], [c["nats_cpu"] for c in fit])
    e = {"broadcast": eb, "interest": ei}
    gc, gd, fb, fi = solve([gw_row(c) for c in fit], [c["gw_cpu"] for c in fit])
    f = {"broadcast": fb, "interest": fi}
    out = []
    p = out.append
    p(f"Cost model fitted to {len(fit)} W8 runs of {a.runs} ({a.hold_out} held out):\n")
    p("| coefficient | meaning | fitted |")
    p("| --- | --- | --- |")
    p(f"| a | nats-server, per stored copy | {na * 1e6:.2f} µs |")
    p(f"| b | nats-server, per copy delivered to a gateway | {nb * 1e6:.2f} µs |")
    p(f"| e (broadcast) | nats-server, per gateway per second | {eb * 1e3:.2f} ms |")
    p(f"| e (interest) | the same, with the gateway's position checks | {ei * 1e3:.2f} ms |")
    p(f"| c | gateways, per message (send, two deliveries, acks) | {gc * 1e6:.2f} µs |")
    p(f"| d | a gateway, per copy it drops | {gd * 1e6:.2f} µs |")
    p(f"| f (broadcast) | a gateway, per second whatever it does | {fb * 1e3:.2f} ms |")
    p(f"| f (interest) | the same, with the position checks | {fi * 1e3:.2f} ms |")
    p("")
    p("Residuals (measured − model, CPU seconds), every run:\n")
    p("| mode | G | messages | copies to gateways | dropped | nats-server measured / model | gateways measured / model |")
    p("| --- | --- | --- | --- | --- | --- | --- |")
    for c in sorted(runs, key=lambda c: (c["mode"], c["g"])):
        nm = na * 2 * c["m"] + nb * c["received"] + e[c["mode"]] * c["g"] * c["wall"]
        gm = gc * c["m"] + gd * c["dropped"] + f[c["mode"]] * c["g"] * c["wall"]
        tag = " (held out)" if c in held else ""
        p(f"| {c['mode']}{tag} | {c['g']} | {c['m']} | {c['received']} | {c['dropped']} | "
          f"{c['nats_cpu']:.2f} / {nm:.2f} | {c['gw_cpu']:.2f} / {gm:.2f} |")
    h = held[0]
    measured = (h["nats_cpu"] + h["gw_cpu"]) / h["m"] * 1e6
    model = (na * 2 * h["m"] + nb * h["received"] + e[h["mode"]] * h["g"] * h["wall"] + gc * h["m"] + gd * h["dropped"]
             + f[h["mode"]] * h["g"] * h["wall"]) / h["m"] * 1e6
    p("")
    p(f"Held-out run ({a.hold_out}): {measured:.1f} µs of CPU per delivered message measured, "
      f"{model:.1f} predicted ({(model - measured) / measured * 100:+.1f}%).")
    p("")
    m = a.rate
    p(f"Predicted CPU per delivered message at {m:,.0f} msg/s (gateways + nats-server, µs), "
      f"and nats-server's share:\n")
    p("| G | broadcast | interest | broadcast nats-server | interest nats-server |")
    p("| --- | --- | --- | --- | --- |")
    crossover = None
    for g in [1, 2, 4, 8, 16, 32, 64, 128, 256]:
        bn = na * 2 * m + nb * 2 * m * g + eb * g
        bg = gc * m + gd * 2 * m * (g - 1) + fb * g
        inn = na * 2 * m + nb * 2 * m + ei * g
        ing = gc * m + fi * g
        b, i = (bn + bg) / m * 1e6, (inn + ing) / m * 1e6
        if crossover is None and i < b:
            crossover = g
        p(f"| {g} | {b:.1f} | {i:.1f} | {bn / m * 1e6:.1f} | {inn / m * 1e6:.1f} |")
    p("")
    if crossover:
        p(f"In steady state (no logins) interest costs less from G = {crossover} on. What it adds is per login "
          f"(a subscription, a flush and one direct get), measured by W7, not per message.")
    else:
        p("In steady state broadcast costs no more than interest at every G above.")
    text = "\n".join(out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
