"""segments.json with each object's label followed by its region words (as the caption says them)."""
import json, sys
sys.path.insert(0, "/work/main")
from pathlib import Path
from evaluation.world import WorldSettings, make_scene, region
world = Path(sys.argv[1]); S = WorldSettings(seed=0)
entries = json.loads((world / "segments.json").read_text())
out = []
for e in entries:
    split, index = e["id"].split("-")
    scene = make_scene(S, split, int(index))
    labels = list(e["labels"])
    for i, t in enumerate(scene.things):
        assert labels[i] == f"{t.size} {t.colour} {t.shape}"
        labels[i] += " " + region(t.x, t.y, scene.size)
    if scene.glyph is not None:
        labels[-1] += " " + region(scene.glyph.x, scene.glyph.y, scene.size)
    out.append({**e, "labels": labels})
(world / "segments_region.json").write_text(json.dumps(out))
print(len(out), out[0]["labels"])
