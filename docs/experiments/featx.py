"""Features of the real world's pictures from the densely trained tower: train (3000) and val (200)."""
import sys, json
sys.path.insert(0, "/work/main")
from pathlib import Path
import numpy as np, torch
from PIL import Image
torch.set_num_threads(1)
from transformers import LlavaForConditionalGeneration
world = Path("/work/exp/real/world")
llava = LlavaForConditionalGeneration.from_pretrained("/work/exp/real/pack/llava", dtype=torch.float32)
tower = llava.model.vision_tower
if sys.argv[1] != "none": tower.load_state_dict(torch.load(sys.argv[1], weights_only=True))
tower.eval()
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]; STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
scenes = [json.loads(l) for l in open(world / "scenes.jsonl")]
out = {}
for split, n in (("train", 3000), ("val", 200)):
    chosen = [s for s in scenes if s["split"] == split][:n]
    feats = []
    with torch.no_grad():
        for i in range(0, len(chosen), 50):
            p = torch.stack([torch.from_numpy(np.asarray(Image.open(world / s["image"]).convert("RGB"))).permute(2, 0, 1) for s in chosen[i:i+50]])
            x = (p.float() / 255 - MEAN) / STD
            feats.append(tower(x, output_hidden_states=True).hidden_states[-2][:, 1:])
    out[split] = torch.cat(feats); out[split + "_scenes"] = chosen
torch.save(out, sys.argv[2]); print({k: v.shape for k, v in out.items() if torch.is_tensor(v)})
