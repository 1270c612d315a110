import sys, dataclasses, time
sys.path.insert(0, "/work/main")
from pathlib import Path
import torch
torch.set_num_threads(1)
from evaluation.world import WorldSettings, write_world
from squint.app.tiny_pack import make_llama_tokenizer, write_tiny_pack
from training.world_pack import WORLD_SHAPE, _words
from training.run import TrainSettings, train
root = Path("/work/exp/real"); world = root / "world"; pack = root / "pack"
if not (world / "world.json").exists():
    write_world(world, WorldSettings(seed=0, train=4000, train_videos=0, val_videos=0, test_videos=0))
shape = dataclasses.replace(WORLD_SHAPE, llm_hidden=128, llm_layers=2, llm_heads=4, llm_kv_heads=4)
write_tiny_pack(pack, seed=0, shape=shape, llm_tokenizer=make_llama_tokenizer(_words(world)), clip_words=_words(world), name="world")
t = time.time()
s = train(TrainSettings("clip", pack, world / "captions.json", max_steps=500, batch_size=64, learning_rate=1e-3, save_steps=10**9, logging_steps=50))
print("clip", s["first_loss"], s["final_loss"], round(time.time() - t), flush=True)
