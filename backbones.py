"""Backbones: images -> pooled features, with `feat_dim` set on every model.

    build_backbone("resnet18")          # torchvision ResNet18, fc = Identity      -> (B, 512)
    build_backbone("mobilenet_v2")      # torchvision MobileNetV2, classifier = Id  -> (B, 1280)
    build_backbone("vit_tiny", drop_path_rate=0.1)                                  -> (B, 192)

CNNs are torchvision's own definitions with the classifier replaced by nn.Identity, so the
parameter names stay torchvision's: a backbone state_dict loads into
`torchvision.models.resnet18()` with only `fc.weight`/`fc.bias` missing (SSLight's ResNet and
MobileNetV2 are torchvision's: 7x7 stem, zero_init_residual False, width 1.0).

The ViT is written here (official DINO vision_transformer.py): patch 16, CLS token taken after the
final norm, learned position embeddings interpolated bicubically to any input that is a multiple of
16 (224 -> 14x14 patches, 128 -> 8x8, 96 -> 6x6), stochastic depth, and `last_cls_tokens(x, n)` for
the ViT linear probe (official DINO eval_linear.py: CLS of the last 4 blocks, each through the final
norm).

The facts a training script needs about an arch live here too: `is_vit`, `PATCH_SIZE`,
`memory_format` (channels_last or not, per device) and `sync_batchnorm` (the one place BN becomes
SyncBatchNorm). `read_backbone` reads a checkpoint of the scripts, or the weights released by
official DINO, MoCo, SwAV and SSLight, into these names.
"""
import math
import os
import pickle
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

CNN_FEAT_DIMS = {"mobilenet_v2": 1280, "resnet18": 512, "resnet34": 512, "resnet50": 2048}
VIT_CONFIGS = {  # embed_dim, depth, heads (DINO's vit_tiny / vit_small)
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
}
ARCHS = sorted(CNN_FEAT_DIMS) + sorted(VIT_CONFIGS)
PATCH_SIZE = 16
# CNNs that run faster in channels_last on the CPU (tests/benchmark.py on 2 cores: see README).
CPU_CHANNELS_LAST = {"mobilenet_v2"}


def is_vit(arch):
    return arch in VIT_CONFIGS


def memory_format(arch, device):
    """channels_last for CNNs on CUDA (cuDNN's fast NHWC kernels under AMP) and, on the CPU, for
    the CNNs measured faster with it; ViTs and the rest stay contiguous. Crops use the model's."""
    on_cuda = torch.device(device).type == "cuda"
    channels_last = not is_vit(arch) and (on_cuda or arch in CPU_CHANNELS_LAST)
    return torch.channels_last if channels_last else torch.contiguous_format


def sync_batchnorm(model, device, world_size):
    """BatchNorm -> SyncBatchNorm (statistics over the global batch) with several CUDA processes.
    SyncBatchNorm needs CUDA: CPU processes keep per-process statistics."""
    if world_size > 1 and torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_backbone(arch, drop_path_rate=0.0, patch_size=PATCH_SIZE, img_size=224):
    """Return an nn.Module mapping (B, 3, H, W) images to (B, feat_dim) features.

    drop_path_rate / patch_size / img_size only concern ViTs (img_size sets the size of the learned
    position-embedding grid; other sizes are interpolated)."""
    if arch in CNN_FEAT_DIMS:
        model = getattr(torchvision.models, arch)(weights=None)
        # Remove the classifier but keep torchvision's forward (which already does global
        # average pooling + flatten): parameter names stay loadable into torchvision.
        if arch == "mobilenet_v2":
            model.classifier = nn.Identity()  # drops Dropout + Linear
        else:
            model.fc = nn.Identity()
        model.feat_dim = CNN_FEAT_DIMS[arch]
        model.is_vit = False
        return model
    if arch in VIT_CONFIGS:
        embed_dim, depth, heads = VIT_CONFIGS[arch]
        return VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=heads,
                                 patch_size=patch_size, img_size=img_size,
                                 drop_path_rate=drop_path_rate)
    raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCHS)}")


# ----------------------------------------------------------------------------------------------
# Vision Transformer
# ----------------------------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernel on CUDA
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, num_patches, embed_dim)


class VisionTransformer(nn.Module):
    def __init__(self, embed_dim=192, depth=12, num_heads=3, patch_size=16, img_size=224,
                 mlp_ratio=4.0, drop_path_rate=0.0):
        super().__init__()
        self.feat_dim = embed_dim
        self.is_vit = True
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        # Stochastic depth grows linearly from 0 (first block) to drop_path_rate (last block).
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also on meta
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def interpolate_pos_embed(self, h_patches, w_patches):
        """Position embeddings for an (h_patches x w_patches) grid: bicubic resize of the
        learned grid (official DINO does this for 96 px local crops)."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = int(math.sqrt(patch_pos.shape[1]))
        if (h_patches, w_patches) == (grid, grid):
            return self.pos_embed
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(h_patches, w_patches), mode="bicubic",
                                  align_corners=False).to(cls_pos.dtype)
        return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    def tokens(self, x):
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"ViT input {H}x{W}: not a multiple of the patch {self.patch_size}")
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return x + self.interpolate_pos_embed(H // self.patch_size, W // self.patch_size)

    def forward(self, x):
        x = self.tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]  # CLS token after the final norm

    def last_cls_tokens(self, x, n=4):
        """CLS tokens of the last n blocks, each through the final norm, concatenated:
        (B, n * embed_dim). The ViT linear-probe feature (official DINO eval_linear.py; n=4 ->
        768 for ViT-Tiny)."""
        x = self.tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x)[:, 0])
        return torch.cat(outputs, dim=-1)


def export_backbone(state_dict, path, arch):
    """Write the "backbone.*" weights of a network's state_dict alone: for CNNs they load into
    torchvision.models.<arch>() with only the classifier keys missing; for ViTs into
    build_backbone(arch)."""
    state_dict = {k[len("backbone."):]: v.cpu() for k, v in state_dict.items()
                  if k.startswith("backbone.")}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state_dict, path)
    print(f"exported the {arch} backbone ({len(state_dict)} tensors) to {path}")


def multicrop_features(backbone, crops):
    """Features of crops [g1, g2, l1, ...] (each (B, 3, H, W)), view-major: (len(crops) * B, D).

    Consecutive crops of equal resolution are concatenated and run through the backbone in one
    call: 2 calls (globals, locals) instead of 2 + n (official DINO's MultiCropWrapper). This
    also fixes BatchNorm semantics: backbone BN statistics are computed per resolution group."""
    features, start = [], 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        features.append(backbone(torch.cat(crops[start:end])))
        start = end
    return torch.cat(features)


# ----------------------------------------------------------------------------------------------
# Checkpoints of the scripts and of the upstream code, read into build_backbone's names
# ----------------------------------------------------------------------------------------------

LAYOUTS = ("this project's (method, config, teacher / student / query_encoder / model)",
           "official DINO (teacher / student: [module.]backbone.*)",
           "official MoCo (state_dict: module.encoder_q.*)",
           "SSLight (state_dict: module.{student,teacher,encoder_q,network}.backbone.*)",
           "a backbone state dict (this project's --export, torchvision's, DINO's backbone-only, "
           "SwAV's: [state_dict:] [module.]*)")
OWN_NETWORKS = {"moco": "query_encoder", "swav": "model"}  # DINO: teacher or student
HEADS = ("fc.", "classifier.", "projection_head.", "prototypes.")  # torchvision, MoCo, SwAV heads
# SSLight's ResNet encoder is nn.Sequential(*children[:-2]): children numbered, relu/maxpool bare.
RESNET_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3",
                   "7": "layer4"}


def read_backbone(checkpoint, dino_key="teacher"):
    """The backbone of a checkpoint dict in one of LAYOUTS -> (state dict for build_backbone,
    info: method (a script's, or the layout), arch (None when the file does not say), key (the
    network read), head (DINO's projection head)); ValueError naming the layouts and what the
    file holds. DINO checkpoints hold two networks: `dino_key` picks one. Heads (MoCo's fc,
    SwAV's projection_head / prototypes, torchvision's classifier) are dropped; official DINO's
    ViT names its MLP layers fc1 / fc2 (ours: mlp.0 / mlp.2); SSLight's CNN encoders are renamed
    to torchvision's (MobileNetV2's is torchvision's `features`)."""
    part = lambda state, prefix: {k[len(prefix):]: v for k, v in state.items()
                                  if k.startswith(prefix)}
    method = checkpoint.get("method")  # this project's: the script that wrote it
    dino = all(isinstance(checkpoint.get(k), dict) for k in ("teacher", "student"))
    key = OWN_NETWORKS.get(method, dino_key) if method or dino else None
    if key and key not in checkpoint:
        raise ValueError(f"a {method} checkpoint without {key!r} (it has: "
                         f"{', '.join(map(str, checkpoint))})")
    network = checkpoint[key] if key else checkpoint.get("state_dict", checkpoint)
    network = ({str(k).removeprefix("module."): v for k, v in network.items()}  # DDP's prefix
               if isinstance(network, dict) else {})
    sslight = [k for k in (dino_key, "encoder_q", "network")
               if any(name.startswith(f"{k}.backbone.") for name in network)]
    as_dict = lambda value: value if isinstance(value, dict) else {}
    config = as_dict(checkpoint.get("config"))  # SSLight's: an fvcore CfgNode, a dict here
    arch = (config.get("arch") or as_dict(config.get("MODEL")).get("BACKBONE_ARCH")
            or getattr(checkpoint.get("args"), "arch", None) or checkpoint.get("arch"))
    info = dict(method="exported", key=key, head=None)
    if key:  # this project's, official DINO's: backbone.* and head.*
        state, info["method"] = part(network, "backbone."), method or "official DINO"
        info["head"] = part(network, "head.") if key == dino_key else None
    elif sslight:
        info = dict(info, method="SSLight", key=sslight[0])
        info["head"] = part(network, f"{dino_key}.head.") if sslight[0] == dino_key else None
        state = part(network, f"{sslight[0]}.backbone.")
        encoder = part(state, "encoder.")
        if "0.0.weight" in encoder:  # MobileNetV2: a ConvBNReLU first
            state = {"features." + k: v for k, v in encoder.items()}
        elif encoder:  # a ResNet
            state = {RESNET_CHILDREN.get(k.split(".")[0], "") + k[k.index("."):]: v
                     for k, v in encoder.items()}
    elif any(k.startswith("encoder_q.") for k in network):
        state = part(network, "encoder_q.")
        info = dict(info, method="official MoCo", key="encoder_q")
    else:
        state = network
    state = {k.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2."): v
             for k, v in state.items() if not k.startswith(HEADS)}
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"no backbone in a known layout (read: {'; '.join(LAYOUTS)}); the file "
                         f"holds {describe(checkpoint)}")
    return state, dict(info, arch=arch if arch in ARCHS else None)


def describe(checkpoint, n=6):
    """Its top-level keys and a few tensor names (one level down too), for an error message."""
    tensors = [str(k) for k, v in checkpoint.items() if isinstance(v, torch.Tensor)]
    tensors += [f"{k}.{name}" for k, v in checkpoint.items() if isinstance(v, dict)
                for name, value in v.items() if isinstance(value, torch.Tensor)]
    more = lambda names: ", ".join(map(str, names[:n])) + (
        f" (+{len(names) - n} more)" if len(names) > n else "")
    return f"top-level keys {more(list(checkpoint)) or 'none'}; tensors {more(tensors) or 'none'}"


def load_checkpoint(path):
    """torch.load on the CPU of a checkpoint of any origin: a class of a package not installed
    here comes back as a dict (SSLight's checkpoints pickle their config, an fvcore CfgNode)."""
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=TOLERANT_PICKLE)


class Unpickled(dict):
    """An object whose class cannot be imported here (SSLight's checkpoints pickle their config,
    an fvcore CfgNode): a plain dict of its items, whatever its constructor was given."""

    def __init__(self, *args, **kwargs):
        super().__init__()


class TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return Unpickled


TOLERANT_PICKLE = types.SimpleNamespace(__name__="pickle", Unpickler=TolerantUnpickler,
                                        load=pickle.load)
