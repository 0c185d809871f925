import json
import sys

tag = sys.argv[1]
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    print(
        tag,
        r["T"],
        "rel",
        round(r["rel"], 3),
        "loc",
        round(r["loc"], 3),
        "routed",
        round(r["routed_side_frac"], 2),
        "forced",
        {k: round(v, 3) for k, v in r["forced_rel"].items()},
        "th",
        {k: round(v, 1) for k, v in r["thresholds"].items()},
        "sc",
        {k: [round(x, 1) for x in v.values()] for k, v in r["score_stats"].items()},
        "loc_sc",
        {k: [round(x, 1) for x in v.values()] for k, v in r["loc_score_stats"].items()},
        "edit_rel",
        r["edit_time_rel_mean"],
        flush=True,
    )
