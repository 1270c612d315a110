"""How well do the trained CLIP's patch features say which object (colour, shape, size) is at a patch?"""
import sys, json, time
sys.path.insert(0, "/work/main")
from pathlib import Path
import torch, torch.nn as nn
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
from transformers import LlavaForConditionalGeneration, CLIPImageProcessor
from training.features import vision_features
from evaluation.world import COLOURS, SHAPES, SIZES
root = Path("/work/exp/real"); world = root / "world"; pack = root / "pack"
llava = LlavaForConditionalGeneration.from_pretrained(pack / "llava", dtype=torch.float32)
proc = CLIPImageProcessor.from_pretrained(pack / "clip")
scenes = [json.loads(l) for l in open(world / "scenes.jsonl")]
train = [s for s in scenes if s["split"] == "train"][:2000]; val = [s for s in scenes if s["split"] == "val"][:200]
G = 12
def labels(s, cover):
    y = torch.full((G * G, 3), -1, dtype=torch.long)  # colour, shape, size; -1: background
    cell = s["size"] / G
    for t in s["things"]:
        lab = torch.tensor([list(COLOURS).index(t["colour"]), SHAPES.index(t["shape"]), SIZES.index(t["size"])])
        if cover:
            e = t["extent"]
            for r in range(int((t["y"] - e) // cell), int((t["y"] + e) // cell) + 1):
                for c in range(int((t["x"] - e) // cell), int((t["x"] + e) // cell) + 1):
                    y[min(r, G-1) * G + min(c, G-1)] = lab
        y[min(int(t["y"] // cell), G-1) * G + min(int(t["x"] // cell), G-1)] = lab
    return y
t0 = time.time()
Xtr = vision_features(llava, proc, [world / s["image"] for s in train]); Xva = vision_features(llava, proc, [world / s["image"] for s in val])
print("features", Xtr.shape, round(time.time() - t0), flush=True)
for cover in (False, True):
    Ytr = torch.stack([labels(s, cover) for s in train]); Yva = torch.stack([labels(s, cover) for s in val])
    for hidden in (0, 256):
        d = Xtr.shape[-1]
        body = nn.Identity() if hidden == 0 else nn.Sequential(nn.Linear(d, hidden), nn.GELU())
        width = d if hidden == 0 else hidden
        heads = nn.ModuleList([nn.Linear(width, n + 1) for n in (len(COLOURS), len(SHAPES), len(SIZES))])
        params = list(body.parameters()) + list(heads.parameters())
        opt = torch.optim.Adam(params, lr=3e-3)
        mu, sd = Xtr.mean((0, 1)), Xtr.std((0, 1)) + 1e-6
        x, y = ((Xtr - mu) / sd).reshape(-1, d), Ytr.reshape(-1, 3)
        for step in range(600):
            idx = torch.randint(0, x.shape[0], (4096,))
            h = body(x[idx]); loss = sum(nn.functional.cross_entropy(hd(h), y[idx, k] + 1) for k, hd in enumerate(heads))
            opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            xv, yv = ((Xva - mu) / sd).reshape(-1, d), Yva.reshape(-1, 3)
            h = body(xv); pred = torch.stack([hd(h).argmax(-1) - 1 for hd in heads], -1)
            obj = yv[:, 0] >= 0
            each = (pred[obj] == yv[obj]).float().mean(0).tolist()
            allok = (pred[obj] == yv[obj]).all(-1).float().mean().item()
            bg_ok = (pred[~obj] == -1).all(-1).float().mean().item()
        print(json.dumps({"cover": cover, "hidden": hidden, "colour/shape/size": [round(100*v) for v in each], "all3": round(100*allok), "background_right": round(100*bg_ok)}), flush=True)
