"""Train the vision tower densely: each patch names the object covering it (colour, shape, size; or background)."""
import sys, json, time
sys.path.insert(0, "/work/main")
from pathlib import Path
import numpy as np, torch, torch.nn as nn
from PIL import Image
torch.set_num_threads(1)
from transformers import LlavaForConditionalGeneration
from evaluation.world import COLOURS, SHAPES, SIZES
root = Path("/work/exp/real"); world = root / "world"; pack = root / "pack"
llava = LlavaForConditionalGeneration.from_pretrained(pack / "llava", dtype=torch.float32)
tower = llava.model.vision_tower
scenes = [json.loads(l) for l in open(world / "scenes.jsonl")]
train = [s for s in scenes if s["split"] == "train"][:3000]; val = [s for s in scenes if s["split"] == "val"][:200]
G = 12
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]; STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
def pixels(s): return torch.from_numpy(np.asarray(Image.open(world / s["image"]).convert("RGB"))).permute(2, 0, 1).contiguous()
from evaluation.world import Scene, Thing, Glyph, draw_segments
def labels(s):
    y = torch.full((G * G, 3), -1, dtype=torch.long); n = s["size"]; cell = n // G
    g = s.get("glyph")
    scene = Scene(s["id"], s["split"], n, tuple(Thing(**t) for t in s["things"]), Glyph(**g) if g else None)
    mask = np.asarray(draw_segments(scene)).copy(); mask[mask > len(s["things"])] = 0  # the box: no label here
    m = torch.from_numpy(np.asarray(mask)).long().reshape(G, cell, G, cell).permute(0, 2, 1, 3).reshape(G * G, -1)
    for k in range(G * G):
        counts = torch.bincount(m[k], minlength=9); counts[0] = 0
        if counts.max() >= 0.1 * cell * cell:
            t = s["things"][int(counts.argmax()) - 1]
            y[k] = torch.tensor([list(COLOURS).index(t["colour"]), SHAPES.index(t["shape"]), SIZES.index(t["size"])])
    return y
P = torch.stack([pixels(s) for s in train]); Y = torch.stack([labels(s) for s in train])
Pv = torch.stack([pixels(s) for s in val]); Yv = torch.stack([labels(s) for s in val])
heads = nn.ModuleList([nn.Linear(128, n + 1) for n in (len(COLOURS), len(SHAPES), len(SIZES))])
params = list(tower.parameters()) + list(heads.parameters())
opt = torch.optim.AdamW(params, lr=5e-4)
def feats(p):
    x = (p.float() / 255 - MEAN) / STD
    return tower(x, output_hidden_states=True).hidden_states[-2][:, 1:]
t0 = time.time()
for step in range(1, 1601):
    idx = torch.randint(0, P.shape[0], (32,))
    h = feats(P[idx]); y = Y[idx]
    loss = sum(nn.functional.cross_entropy(hd(h).reshape(-1, hd.out_features), y[..., k].reshape(-1) + 1) for k, hd in enumerate(heads))
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 400 == 0:
        with torch.no_grad():
            h = feats(Pv).reshape(-1, 128); yv = Yv.reshape(-1, 3)
            pred = torch.stack([hd(h).argmax(-1) - 1 for hd in heads], -1); obj = yv[:, 0] >= 0
            each = (pred[obj] == yv[obj]).float().mean(0).tolist()
            print(json.dumps({"step": step, "loss": round(loss.item(), 3), "colour/shape/size": [round(100*v) for v in each], "all3": round(100*(pred[obj] == yv[obj]).all(-1).float().mean().item()), "bg": round(100*(pred[~obj] == -1).all(-1).float().mean().item()), "s": round(time.time()-t0)}), flush=True)
torch.save(tower.state_dict(), "/work/exp/tower.pt")
