"""Experiment: can a from-scratch tiny Llama learn the world's lookups from
 - words:  the caption, then questions
 - objtok: 144 grid tokens, each object's centre patch = sum of its word embeddings (+ row/col embeddings)
 - onehot: 144 grid tokens, one-hot attributes through an MLP projector (the oracle)
8 answers a sequence, fresh scenes, teacher-forced first-token accuracy per family."""
import argparse, random, re, sys, time, json
import torch, torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM
sys.path.insert(0, "/work/main")
from evaluation.world import WorldSettings, make_scene, training_questions, caption, COLOURS, SHAPES, SIZES, DIGITS, GRID

p = argparse.ArgumentParser()
p.add_argument("--form", default="objtok")
p.add_argument("--families", default="attribute,existence,count,spatial,detail")
p.add_argument("--steps", type=int, default=2000)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--lr", type=float, default=3e-4)
p.add_argument("--answers", type=int, default=8)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--hidden", type=int, default=128)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--grid", type=int, default=12)
p.add_argument("--cover", action="store_true", help="objects on every patch they cover")
p.add_argument("--eval-every", type=int, default=250)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--freeze-llm", action="store_true")
p.add_argument("--word-basis", action="store_true")
p.add_argument("--features", default="")
p.add_argument("--align-nopos", action="store_true")
p.add_argument("--align-steps", type=int, default=0)
p.add_argument("--load", default="")
p.add_argument("--balanced", action="store_true")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--pos-words", type=int, default=0, help="objects located by R{row} C{col} tokens on a G-grid")
p.add_argument("--save", default="")
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(a.seed)
FAM = a.families.split(",")
S = WorldSettings(seed=7)
WORDS = sorted(set(re.findall(r"[a-z]+", " ".join(
    [caption(make_scene(S, "train", i)).lower() for i in range(300)] +
    [q.question.lower() for i in range(300) for q in training_questions(make_scene(S, "train", i))]))) | set(COLOURS) | set(SHAPES) | set(SIZES) | {"box", "digit", "yes", "no"})
SPECIAL = ["<pad>", "<bos>", "<sep>", "<ans>", "<eos>", "<bg>", "?", ",", "."] + list("0123456789ABCD") + [f"R{i}" for i in range(16)] + [f"C{i}" for i in range(16)]
VOCAB = SPECIAL + WORDS
ID = {w: i for i, w in enumerate(VOCAB)}
def tok(text):
    text = text.split("\n")[0]  # question only; instructions and options dropped (constant)
    out = []
    for w in re.findall(r"[A-Za-z]+|\d|[?,.]", text):
        out.append(ID[w] if w in ID else ID[w.lower()])
    return out

def rc(scene, x, y):
    G = a.pos_words; cell = scene.size / G
    return min(int(y // cell), G - 1), min(int(x // cell), G - 1)
def pos_caption(scene):
    parts = [(t.x, [ID[t.size], ID[t.colour], ID[t.shape]] + [ID[f"R{rc(scene, t.x, t.y)[0]}"], ID[f"C{rc(scene, t.x, t.y)[1]}"]]) for t in scene.things]
    if scene.glyph is not None:
        g = scene.glyph; parts.append((g.x, [ID["box"], ID[g.digit], ID[f"R{rc(scene, g.x, g.y)[0]}"], ID[f"C{rc(scene, g.x, g.y)[1]}"]]))
    out = []
    for _, ids in sorted(parts, key=lambda q: q[0]): out += ids + [ID[","]]
    return out
def grid_of(scene):
    g = a.grid; cell = scene.size / g
    cells = {}
    for t in scene.things:
        if a.cover:
            x0, y0, x1, y1 = t.box()
            for r in range(int(y0 // cell), int(y1 // cell) + 1):
                for c in range(int(x0 // cell), int(x1 // cell) + 1):
                    cells[(min(r, g-1), min(c, g-1))] = ("thing", t)
        cells[(min(int(t.y // cell), g-1), min(int(t.x // cell), g-1))] = ("thing", t)
    if scene.glyph is not None:
        gl = scene.glyph
        cells[(min(int(gl.y // cell), g-1), min(int(gl.x // cell), g-1))] = ("glyph", gl)
    return cells

ONEHOT = list(COLOURS) + list(SHAPES) + list(SIZES) + list(DIGITS) + ["box"]
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=a.hidden, intermediate_size=a.hidden*4 if a.hidden < 256 else a.hidden*3,
                          num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                          max_position_embeddings=1024, tie_word_embeddings=False)
        self.llm = LlamaForCausalLM(cfg)
        self.row = nn.Embedding(a.grid, a.hidden); self.col = nn.Embedding(a.grid, a.hidden)
        nn.init.normal_(self.row.weight, std=0.02); nn.init.normal_(self.col.weight, std=0.02)
        self.proj = nn.Sequential(nn.Linear(128 if a.features else len(ONEHOT) + 2 * a.grid, a.hidden), nn.GELU(), nn.Linear(a.hidden, a.hidden))
    def grid_embeds(self, scenes):
        E = self.llm.get_input_embeddings()
        g = a.grid
        rows = torch.arange(g).repeat_interleave(g); cols = torch.arange(g).repeat(g)
        out = []
        for s in scenes:
            if a.form == "feat":
                scene, split, index = s
                out.append(self.proj(FEATS[split][index])); continue
            cells = grid_of(s)
            if a.form == "objtok":
                ids = torch.full((g*g, 3), ID["<bg>"], dtype=torch.long)
                mask = torch.zeros(g*g, 3)
                mask[:, 0] = 1
                for (r, c), (kind, o) in cells.items():
                    k = r*g + c
                    if kind == "thing": ids[k] = torch.tensor([ID[o.size], ID[o.colour], ID[o.shape]]); mask[k] = 1
                    else: ids[k, :2] = torch.tensor([ID["box"], ID[o.digit]]); mask[k, :2] = 1
                x = (E(ids) * mask[..., None]).sum(1)
                if a.pos_words:
                    for (r, c), (kind, o) in cells.items():
                        pr, pc = rc(s, o.x, o.y)
                        x[r*g + c] = x[r*g + c] + E(torch.tensor(ID[f"R{pr}"])) + E(torch.tensor(ID[f"C{pc}"]))
                if not ((a.align_nopos and a.form == "objtok" and a.features) or a.pos_words): x = x + self.row(rows) + self.col(cols)
            else:
                f = torch.zeros(g*g, len(ONEHOT) + 2*g)
                f[torch.arange(g*g), len(ONEHOT) + rows] = 1; f[torch.arange(g*g), len(ONEHOT) + g + cols] = 1
                for (r, c), (kind, o) in cells.items():
                    k = r*g + c
                    if kind == "thing":
                        for w in (o.colour, o.shape, o.size): f[k, ONEHOT.index(w)] = 1
                    else:
                        f[k, ONEHOT.index("box")] = 1; f[k, ONEHOT.index(o.digit)] = 1
                x = self.proj(f)
            out.append(x)
        return out

FEATS = torch.load(a.features, weights_only=True) if a.features else None
if FEATS is not None:
    from evaluation.world import Scene, Thing, Glyph
    def _scene(d):
        g = d.get("glyph")
        return Scene(d["id"], d["split"], d["size"], tuple(Thing(**t) for t in d["things"]), Glyph(**g) if g else None)
    POOL = {sp: [_scene(d) for d in FEATS[sp + "_scenes"]] for sp in ("train", "val")}
def sample(split, index, rng):
    if FEATS is not None:
        index = index % len(POOL[split])
        scene = POOL[split][index]
        qs = [q for q in training_questions(scene) if q.category in FAM]
        rng.shuffle(qs)
        by = {}
        for q in qs: by.setdefault(q.category, []).append(q)
        fams = list(by); picked = [by[fams[k % len(fams)]][(k // len(fams)) % len(by[fams[k % len(fams)]])] for k in range(a.answers)]
        rng.shuffle(picked)
        return (scene, split, index), picked
    while True:
        try:
            scene = make_scene(S, split, index); break
        except RuntimeError:
            index += 10**7
    qs = [q for q in training_questions(scene) if q.category in FAM]
    rng.shuffle(qs)
    if a.balanced:
        by = {}
        for q in qs: by.setdefault(q.category, []).append(q)
        fams = list(by); picked = []
        for k in range(a.answers):
            pool = by[fams[k % len(fams)]]
            picked.append(pool[(k // len(fams)) % len(pool)])
        rng.shuffle(picked)
        return scene, picked
    return scene, qs[:a.answers]

def batch_tensors(model, items):
    E = model.llm.get_input_embeddings()
    seqs, labels, fams = [], [], []
    grids = model.grid_embeds([s for s, _ in items]) if a.form != "words" else None
    for n, (scene, qs) in enumerate(items):
        head = [ID["<bos>"]]
        parts = [E(torch.tensor(head))]
        lab = [-100]
        if a.form == "words":
            sc = scene[0] if isinstance(scene, tuple) else scene
            ct = pos_caption(sc) if a.pos_words else tok(caption(sc).lower()); parts.append(E(torch.tensor(ct))); lab += [-100]*len(ct)
        else:
            parts.append(grids[n]); lab += [-100]*grids[n].shape[0]
        ids = [ID["<sep>"]]; lab += [-100]; fam = [None]
        for q in qs:
            qt = tok(q.question) + [ID["<ans>"]]
            at = [ID[q.answer] if q.answer in ID else ID[q.answer.lower()], ID["<eos>"]]
            ids += qt + at
            lab += [-100]*len(qt) + at  # label at position of token itself; shift below
            fam += [None]*len(qt) + [q.category, None]
        parts.append(E(torch.tensor(ids)))
        x = torch.cat(parts)
        seqs.append(x); labels.append(torch.tensor(lab)); fams.append([None]*(x.shape[0]-len(fam)) + fam)
    L = max(s.shape[0] for s in seqs)
    X = torch.zeros(len(seqs), L, a.hidden); Y = torch.full((len(seqs), L), -100); M = torch.zeros(len(seqs), L, dtype=torch.long)
    F = []
    for i, (s, l, f) in enumerate(zip(seqs, labels, fams)):
        X[i, :s.shape[0]] = s; Y[i, :s.shape[0]] = l; M[i, :s.shape[0]] = 1; F.append(f + [None]*(L - len(f)))
    return X, Y, M, F

model = Model()
def word_basis():
    E = model.llm.get_input_embeddings().weight.detach()
    lin = model.proj[2]
    with torch.no_grad():
        lin.weight.zero_()
        for j, w in enumerate(ONEHOT): lin.weight[:, j] = E[ID[w]]
        lin.bias.copy_(E[ID["<bg>"]])
if a.load:
    state = torch.load(a.load, weights_only=True)
    if a.freeze_llm or a.features: state = {k: v for k, v in state.items() if not k.startswith("proj.")}
    print("loaded", a.load, model.load_state_dict(state, strict=False), flush=True)
if a.word_basis: word_basis()
if a.align_steps:
    form = a.form; a.form = "objtok"
    with torch.no_grad():
        targets = torch.stack(model.grid_embeds(POOL["train"])); vtargets = torch.stack(model.grid_embeds(POOL["val"]))
    a.form = form
    aopt = torch.optim.Adam(model.proj.parameters(), lr=1e-3)
    X, Xv = FEATS["train"], FEATS["val"]
    for st in range(1, a.align_steps + 1):
        idx = torch.randint(0, X.shape[0], (64,))
        loss = ((model.proj(X[idx]) - targets[idx]) ** 2).mean()
        aopt.zero_grad(); loss.backward(); aopt.step()
        if st % 250 == 0:
            with torch.no_grad():
                rel = (((model.proj(Xv) - vtargets) ** 2).mean() / ((vtargets - vtargets.mean((0, 1))) ** 2).mean()).item()
            print(json.dumps({"align_step": st, "val_relative_error": round(rel, 4)}), flush=True)
params = list(model.proj.parameters()) if a.freeze_llm else list(model.parameters())
if a.freeze_llm: model.llm.requires_grad_(False)
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s+1)/100))
rng = random.Random(a.seed)
val = [sample("val", i, random.Random(i)) for i in range(400)]
# per family, up to 150 questions
def evaluate():
    model.eval(); right = {f: 0 for f in FAM}; total = {f: 0 for f in FAM}
    with torch.no_grad():
        for i in range(0, len(val), 50):
            X, Y, M, F = batch_tensors(model, val[i:i+50])
            logits = model.llm(inputs_embeds=X, attention_mask=M).logits
            pred = logits[:, :-1].argmax(-1); tgt = Y[:, 1:]
            for b in range(X.shape[0]):
                for t in range(X.shape[1]-1):
                    f = F[b][t+1]
                    if f is not None and total[f] < 300:
                        total[f] += 1; right[f] += int(pred[b, t] == tgt[b, t])
    model.train()
    return {f: round(100*right[f]/max(total[f],1)) for f in FAM}, sum(right.values())/max(sum(total.values()),1)
t0 = time.time(); next_index = 0; losses = []
for step in range(1, a.steps+1):
    items = [sample("train", next_index + k, rng) for k in range(a.batch)]; next_index += a.batch
    X, Y, M, F = batch_tensors(model, items)
    out = model.llm(inputs_embeds=X, attention_mask=M, labels=Y)
    out.loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step(); opt.zero_grad()
    losses.append(out.loss.item())
    if step % a.eval_every == 0 or step == a.steps:
        fam, acc = evaluate()
        if a.save: torch.save(model.state_dict(), a.save)
        print(json.dumps({"step": step, "loss": round(sum(losses[-50:])/len(losses[-50:]), 3), "acc": round(100*acc, 1), "fam": fam, "s": round(time.time()-t0)}), flush=True)
if a.save: torch.save(model.state_dict(), a.save)
