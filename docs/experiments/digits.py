"""Can the world pack's tower learn the digit at the glyph's patches? CE over 10 digits there only."""
import sys, json, time
sys.path.insert(0, "/work/main")
from pathlib import Path
import numpy as np, torch, torch.nn as nn
from transformers import LlavaForConditionalGeneration, CLIPImageProcessor
from evaluation.world import WorldSettings, make_scene, draw_scene, draw_segments, DIGITS
torch.set_num_threads(2)
pack = Path(sys.argv[1]); steps = int(sys.argv[2]); lr = float(sys.argv[3]); n_train = int(sys.argv[4]) if len(sys.argv) > 4 else 1500
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]; STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
llava = LlavaForConditionalGeneration.from_pretrained(pack / "llava"); tower = llava.model.vision_tower
proc = CLIPImageProcessor.from_pretrained(pack / "clip"); L = llava.config.vision_feature_layer
S = WorldSettings(seed=0); D = list(DIGITS)
def data(split, n):
    X, Y = [], []
    i = 0
    while len(X) < n:
        try:
            s = make_scene(S, split, i); i += 1
        except RuntimeError:
            i += 1; continue
        if s.glyph is None: continue
        seg = torch.from_numpy(np.asarray(draw_segments(s), dtype=np.int64)).reshape(12, 28, 12, 28).permute(0, 2, 1, 3).reshape(144, -1)
        box = len(s.things) + 1
        y = torch.full((144,), -100); y[(seg == box).sum(-1) >= 78] = D.index(s.glyph.digit)
        X.append(torch.from_numpy(np.asarray(draw_scene(s))).permute(2, 0, 1).contiguous()); Y.append(y)
    return torch.stack(X), torch.stack(Y)
X, Y = data("train", n_train)
Xv, Yv = data("val", 100)
def norm(x): return (x.float() / 255 - MEAN) / STD
head = nn.Linear(128, 10); opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=lr)
t0 = time.time()
for step in range(1, steps + 1):
    idx = torch.randint(0, X.shape[0], (32,))
    h = tower(norm(X[idx]), output_hidden_states=True).hidden_states[L][:, 1:]
    loss = nn.functional.cross_entropy(head(h).reshape(-1, 10), Y[idx].reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 0:
        with torch.no_grad():
            p = head(tower(norm(Xv), output_hidden_states=True).hidden_states[L][:, 1:]).argmax(-1)
            m = Yv >= 0
        print(json.dumps({"step": step, "loss": round(loss.item(), 3), "val_digit_acc": round(100 * (p[m] == Yv[m]).float().mean().item()), "s": round(time.time() - t0)}), flush=True)
