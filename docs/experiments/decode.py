"""What the projected visual tokens say, patch by patch: nearest label word per group (val pictures)."""
import sys, json
sys.path.insert(0, "/work/main")
from pathlib import Path
import torch
from transformers import LlavaForConditionalGeneration, AutoTokenizer, CLIPImageProcessor
from evaluation.world import WorldSettings, make_scene, draw_scene, draw_segments, segment_labels, COLOURS, SHAPES, SIZES, DIGITS
from training.patches import SegmentedPicture, patch_words, word_embeddings
pack = Path(sys.argv[1]); tmp = Path("/tmp/decode"); tmp.mkdir(exist_ok=True)
llava = LlavaForConditionalGeneration.from_pretrained(pack / "llava").eval()
tok = AutoTokenizer.from_pretrained(pack / "llava"); proc = CLIPImageProcessor.from_pretrained(pack / "clip")
S = WorldSettings(seed=0)
groups = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "digit": list(DIGITS)}
words = sorted({w for g in groups.values() for w in g} | {"box"})
col = {w: i for i, w in enumerate(words)}
E = word_embeddings(words, tok, llava.get_input_embeddings())
right = {g: 0 for g in groups}; total = {g: 0 for g in groups}; bg = []
for i in range(150):
    s = make_scene(S, "val", i)
    draw_scene(s).save(tmp / "p.png"); draw_segments(s).save(tmp / "s.png")
    pic = SegmentedPicture(s.id, tmp / "p.png", tmp / "s.png", tuple(segment_labels(s)))
    y = patch_words(pic, 12, 336, col)
    with torch.no_grad():
        px = proc(images=[draw_scene(s)], return_tensors="pt")["pixel_values"]
        h = llava.model.vision_tower(px, output_hidden_states=True).hidden_states[llava.config.vision_feature_layer][:, 1:]
        t = llava.model.multi_modal_projector(h)[0]
    for k in range(144):
        present = [words[j] for j in torch.nonzero(y[k]).flatten().tolist()]
        if not present: bg.append(t[k].norm().item()); continue
        for g, gw in groups.items():
            truth = [w for w in present if w in gw]
            if not truth: continue
            idx = [col[w] for w in gw]
            C = E[idx] - E[idx].mean(0); scores = C @ t[k]
            total[g] += 1; right[g] += int(gw[int(scores.argmax())] == truth[0])
print(json.dumps({g: round(100 * right[g] / max(total[g], 1)) for g in groups}), "counts", total, "bg norm", round(sum(bg) / len(bg), 4), "word norm", round(E.norm(dim=-1).mean().item(), 4))
