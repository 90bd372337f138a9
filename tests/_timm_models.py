"""Small timm models covering every ViT feature the adapter must honour (random weights, no download)."""
import timm
import torch


def _randomize_layerscale(model):
    # LayerScale's default init (1e-5) would hide an adapter that skips it; make it matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.normal_(1.0, 0.5)
    return model


def build(kind: str, depth: int = None) -> torch.nn.Module:
    """A small model of the given kind; ``depth`` overrides the (short) default depth."""
    torch.manual_seed(0)
    if kind == "vit_b16":
        model = timm.create_model("vit_base_patch16_224")
    elif kind == "tiny":
        model = timm.create_model("vit_tiny_patch16_224", depth=depth or 4)
    elif kind == "layerscale":
        model = _randomize_layerscale(timm.create_model("deit3_small_patch16_224", depth=depth or 4))
    elif kind == "qk_norm":
        model = timm.create_model("vit_small_patch16_224", depth=depth or 4, qk_norm=True)
    elif kind == "registers_avg":
        model = timm.create_model("vit_base_patch16_reg4_gap_256", depth=depth or 3, embed_dim=192, num_heads=3)
    elif kind == "dinov2_registers":
        model = _randomize_layerscale(timm.create_model("vit_small_patch14_reg4_dinov2", img_size=224, depth=depth or 3))
    elif kind == "distilled":
        model = timm.create_model("deit_small_distilled_patch16_224", depth=depth or 4)
    elif kind == "map_head":
        model = timm.create_model("vit_base_patch16_siglip_224", depth=depth or 3, embed_dim=192, num_heads=3)
    else:
        raise KeyError(kind)
    return model.eval()


def images(model, batch=2, seed=0):
    size = (3, *model.patch_embed.img_size)
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))


FEATURE_MODELS = ["tiny", "layerscale", "qk_norm", "registers_avg", "dinov2_registers", "distilled", "map_head"]
