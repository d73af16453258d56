"""Per-request events of the broker and the floor from callgrind.sh's dumps: totals, then the
functions whose own (exclusive) cost differs most. Usage: callgrind_diff.py DIR EVENTS [N],
EVENTS e.g. Ir or D1mr+D1mw."""
import collections
import json
import sys


def exclusive(path):
    cost, fn, events, callee_line = collections.Counter(), None, [], False
    for line in open(path, errors="replace"):
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("fn="):
            fn, callee_line = line[3:].strip(), False
        elif line.startswith("calls="):
            callee_line = True  # the next cost line is the callee's inclusive cost
        elif fn and (line[:1].isdigit() or line[:1] in ("+", "-", "*")):
            if callee_line:
                callee_line = False
                continue
            for event, value in zip(events, line.split()[1:]):
                cost[(fn, event)] += int(value)
    return cost


def side(folder, name):
    requests = json.loads(open(f"{folder}/{name}.json").read().strip().splitlines()[-1])["requests"]
    return exclusive(f"{folder}/{name}.out.1"), requests


folder, wanted = sys.argv[1], sys.argv[2].split("+")
rows = int(sys.argv[3]) if len(sys.argv) > 3 else 30
(broker, nb), (floor, nf) = side(folder, "broker"), side(folder, "floor")
for event in ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw"):
    b = sum(v for (_, e), v in broker.items() if e == event) / nb
    f = sum(v for (_, e), v in floor.items() if e == event) / nf
    print(f"{event:5} per request: broker {b:11,.0f}  floor {f:11,.0f}  ratio {b / f:.3f}")
per = lambda cost, n, fn: sum(cost.get((fn, e), 0) for e in wanted) / n
names = {fn for fn, _ in broker} | {fn for fn, _ in floor}
print(f"\n{'+'.join(wanted)} per request: broker, floor, difference, function")
for fn in sorted(names, key=lambda fn: -(per(broker, nb, fn) - per(floor, nf, fn)))[:rows]:
    b, f = per(broker, nb, fn), per(floor, nf, fn)
    print(f"{b:10,.0f} {f:10,.0f} {b - f:+10,.0f}  {fn[:140]}")
