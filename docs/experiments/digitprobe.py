"""Linear probe of a pack's frozen tower: the digit at the box's patches (fresh pictures)."""
import sys, json
sys.path.insert(0, "/work/main")
from pathlib import Path
import numpy as np, torch, torch.nn as nn
from transformers import LlavaForConditionalGeneration
from evaluation.world import WorldSettings, make_scene, draw_scene, draw_segments, DIGITS
torch.set_num_threads(1)
pack = Path(sys.argv[1]); n = int(sys.argv[2])
llava = LlavaForConditionalGeneration.from_pretrained(pack / "llava").eval(); tower = llava.model.vision_tower
L = llava.config.vision_feature_layer
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]; STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
S = WorldSettings(seed=0); D = list(DIGITS)
def data(split, n):
    X, Y, P = [], [], []
    i = 0
    while len(X) < n:
        try: s = make_scene(S, split, i)
        except RuntimeError: i += 1; continue
        i += 1
        if s.glyph is None: continue
        seg = torch.from_numpy(np.asarray(draw_segments(s), dtype=np.int64)).reshape(12, 28, 12, 28).permute(0, 2, 1, 3).reshape(144, -1)
        m = (seg == len(s.things) + 1).sum(-1) >= 78
        X.append(torch.from_numpy(np.asarray(draw_scene(s))).permute(2, 0, 1).contiguous()); Y.append(D.index(s.glyph.digit)); P.append(m)
    return torch.stack(X), torch.tensor(Y), torch.stack(P)
def feats(X, P):
    out = []
    with torch.no_grad():
        for k in range(0, len(X), 64):
            h = tower((X[k:k+64].float() / 255 - MEAN) / STD, output_hidden_states=True).hidden_states[L][:, 1:]
            out.append(h)
    H = torch.cat(out)
    return H, P
X, Y, P = data("probe", n); Xv, Yv, Pv = data("probev", 300)
H, _ = feats(X, P); Hv, _ = feats(Xv, Pv)
def rows(H, Y, P):
    idx = P.nonzero(); return H[idx[:, 0], idx[:, 1]], Y[idx[:, 0]]
A, b = rows(H, Y, P); Av, bv = rows(Hv, Yv, Pv)
mu, sd = A.mean(0), A.std(0) + 1e-6
head = nn.Linear(A.shape[1], 10); opt = torch.optim.Adam(head.parameters(), 1e-2)
for step in range(1500):
    loss = nn.functional.cross_entropy(head((A - mu) / sd), b); opt.zero_grad(); loss.backward(); opt.step()
acc = (head((Av - mu) / sd).argmax(-1) == bv).float().mean().item()
tr = (head((A - mu) / sd).argmax(-1) == b).float().mean().item()
print(json.dumps({"patches": len(A), "train_acc": round(100 * tr), "val_acc": round(100 * acc)}))
