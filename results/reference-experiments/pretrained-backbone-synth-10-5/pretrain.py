"""Scratch: pretrain the tiny preset's ResNet on dense classification of catalogue classes 21..150."""
import sys, time, math
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from benchmark.data.synth import SynthSpec, stuff_background, _draw_things, _finish
from benchmark.data.transforms import PIXEL_MEAN
from benchmark.engine.presets import get_preset
from transformers import AutoBackbone
from safetensors.torch import save_file

out, iters = sys.argv[1], int(sys.argv[2]); lo = int(sys.argv[3]) if len(sys.argv) > 3 else 21
torch.manual_seed(0); torch.set_num_threads(2)
spec = SynthSpec(num_classes=150)
N, S = 3000, 64
rng = np.random.default_rng(12345)
imgs = np.zeros((N, S, S, 3), np.uint8); labs = np.zeros((N, S, S), np.int64)
t = time.time()
for i in range(N):
    im = stuff_background(S, S, rng)
    inst = _draw_things(spec, im, rng, int(rng.integers(lo, 151)), lambda: int(rng.integers(lo, 151)))
    imgs[i] = _finish(im, rng)
    for c, m in inst: labs[i][m] = c - lo + 1
print("data", time.time() - t, flush=True)
K = 151 - lo + 1
mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1); std = torch.tensor((58.395, 57.12, 57.375)).view(1, 3, 1, 1)
bb = AutoBackbone.from_config(get_preset("tiny").backbone.to_config())
chans = bb.channels
head = nn.ModuleList([nn.Conv2d(c, 64, 1) for c in chans]); cls = nn.Conv2d(64, K, 1)
params = list(bb.parameters()) + list(head.parameters()) + list(cls.parameters())
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
X = torch.from_numpy(imgs).permute(0, 3, 1, 2).float(); Y = torch.from_numpy(labs)
g = torch.Generator().manual_seed(0)
t = time.time()
for it in range(iters):
    lr = 1e-3 * (1 - it / iters) ** 0.9
    for pg in opt.param_groups: pg["lr"] = lr
    idx = torch.randint(0, N, (16,), generator=g)
    x = (X[idx] - mean) / std; y = Y[idx]
    if torch.rand(1, generator=g) < 0.5: x, y = x.flip(-1), y.flip(-1)
    feats = bb(x).feature_maps
    z = sum(F.interpolate(h(f), size=(S // 4, S // 4), mode="bilinear", align_corners=False) for h, f in zip(head, feats))
    logit = F.interpolate(cls(F.relu(z)), size=(S, S), mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logit, y)
    opt.zero_grad(); loss.backward(); opt.step()
    if it % 200 == 0 or it == iters - 1:
        with torch.no_grad():
            fg = y > 0; acc = (logit.argmax(1)[fg] == y[fg]).float().mean().item()
        print(it, round(loss.item(), 3), "fg acc", round(acc, 3), round(time.time() - t, 1), flush=True)
save_file({k: v.contiguous() for k, v in bb.state_dict().items()}, out)
print("saved", out)
