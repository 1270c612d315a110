"""dense_more.py PACK N CAP: `squint train dense` N more steps on a copy of a pack with the positive-weight cap set to CAP."""
import sys
sys.path.insert(0, "/work/main")
from pathlib import Path
import training.patches as patches
from training.run import TrainSettings, train
pack, steps, cap = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
patches.PatchWordsDataset.positive_weights.__defaults__ = (cap,)
s = train(TrainSettings("dense", pack, Path("/work/exp/wpA/world/segments.json"), max_steps=steps, batch_size=32,
                        learning_rate=5e-4, save_steps=10**9, logging_steps=50, run_name=f"dense-cap{int(cap)}"))
print(s["first_loss"], s["final_loss"], s["seconds"])
