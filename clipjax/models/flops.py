"""Analytic FLOPs per sample of the CLIP towers, for MFU and `clipjax compile`.

Counts matrix multiplies and convolutions only, 2*m*n*k each (one multiply-add
is two FLOPs), as the model computes them: full T x T attention scores even where
the causal mask discards half, one query in the ResNet's attention pool, and one
query through a transformer's last block, whose other tokens feed nothing (unrolled
or scanned: a scanned stack runs L-1 layers in its scan, then the pooled last block).
Element-wise work (LayerNorm, activations, softmax) is left out, as in the
usual 6*N*D accounting; a train step is ~3x the forward pass (backward = 2x).
"""

from __future__ import annotations

from ml_collections import ConfigDict

TRAIN_MULTIPLIER = 3.0  # forward + backward (grads w.r.t. activations and weights)


def transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float,
                      pooled_last: bool = False) -> float:
    """Forward FLOPs of `layers` pre-LN blocks over one sequence of `tokens`; with
    `pooled_last`, the last block computes keys/values for every token but the rest
    (query, attention, output projection, MLP) for the one pooled token only."""
    hidden = int(width * mlp_ratio)

    def block(queries: int) -> float:
        kv = 2 * tokens * width * 2 * width
        rest = 2 * queries * width * (width + width + 2 * hidden)  # q, out, mlp
        return kv + rest + 2 * 2 * queries * tokens * width  # scores and weighted values

    if layers and pooled_last:
        return float((layers - 1) * block(tokens) + block(1))
    return float(layers * block(tokens))


def vit_flops(img: ConfigDict, embed_dim: int, pooled_last: bool = False,
              training: bool = False) -> float:
    """`training`: only the patches that patch dropout keeps enter the tower."""
    from clipjax.config import kept_patches

    grid = img.image_size // img.patch_size
    patches = grid * grid
    if training:
        patches = kept_patches(patches, img.get("patch_dropout", 0.0))
    embed = 2 * patches * (img.patch_size ** 2 * 3) * img.width
    pooled_last = pooled_last and img.get("pool", "tok") == "tok"  # avg needs every token
    blocks = transformer_flops(patches + 1, img.width, img.layers, img.mlp_ratio, pooled_last)
    return float(embed + blocks + 2 * img.width * embed_dim)


def _conv(size: int, kernel: int, cin: int, cout: int) -> float:
    return 2.0 * size * size * kernel * kernel * cin * cout


def resnet_flops(img: ConfigDict, embed_dim: int) -> float:
    w, size = img.resnet_width, img.image_size // 2
    total = _conv(size, 3, 3, w // 2) + _conv(size, 3, w // 2, w // 2) + _conv(size, 3, w // 2, w)
    size //= 2  # stem avgpool
    inplanes = w
    for stage, blocks in enumerate(img.resnet_layers):
        planes = w * 2 ** stage
        for j in range(int(blocks)):
            stride = 2 if stage > 0 and j == 0 else 1
            out = size // stride
            total += _conv(size, 1, inplanes, planes) + _conv(size, 3, planes, planes)
            total += _conv(out, 1, planes, planes * 4)
            if stride > 1 or inplanes != planes * 4:
                total += _conv(out, 1, inplanes, planes * 4)
            inplanes, size = planes * 4, out
    c, tokens = w * 32, size * size + 1
    pool = 2 * tokens * c * 2 * c + 2 * c * c + 2 * 2 * tokens * c + 2 * c * embed_dim
    return float(total + pool)


def _pooled_last(model_cfg: ConfigDict, pooled_last: bool | None) -> bool:
    """Towers compute only the pooled token through the last block, unrolled or scanned
    (L-1 scanned layers, then the last block on the pooled tokens). Under gradient
    accumulation a scanned tower runs the full last block (less memory there, see
    `Transformer.scan_pooled_last`); the count stays the pooled work: the model's."""
    return True if pooled_last is None else pooled_last


def image_flops(model_cfg: ConfigDict, pooled_last: bool | None = None,
                training: bool = False) -> float:
    """Forward FLOPs of the image tower for one image (`pooled_last`: None = as clipjax
    computes it; False = every token through every block, as open_clip does;
    `training`: the tokens `model.image.patch_dropout` keeps)."""
    img = model_cfg.image
    if img.kind == "resnet":
        return resnet_flops(img, model_cfg.embed_dim)
    return vit_flops(img, model_cfg.embed_dim, _pooled_last(model_cfg, pooled_last), training)


def text_flops(model_cfg: ConfigDict, length: int | None = None,
               pooled_last: bool | None = None) -> float:
    """Forward FLOPs of the text tower for one sequence (default: the context length)."""
    txt = model_cfg.text
    tokens = length or txt.context_length
    blocks = transformer_flops(tokens, txt.width, txt.layers, txt.mlp_ratio,
                               _pooled_last(model_cfg, pooled_last))
    return float(blocks + 2 * txt.width * model_cfg.embed_dim)


def forward_flops(model_cfg: ConfigDict, pooled_last: bool | None = None,
                  training: bool = False) -> dict[str, float]:
    """Per-sample forward FLOPs: {'image', 'text', 'total'} (one image-text pair;
    `training`: with patch dropout's kept tokens)."""
    image = image_flops(model_cfg, pooled_last, training)
    text = text_flops(model_cfg, pooled_last=pooled_last)
    return {"image": image, "text": text, "total": image + text}


def forward_flops_per_sample(model_cfg: ConfigDict) -> float:
    """Forward FLOPs of one image-text pair through both towers."""
    return forward_flops(model_cfg)["total"]


def train_flops_per_sample(model_cfg: ConfigDict) -> float:
    """FLOPs of one training step per image-text pair (~3x forward); excludes the loss,
    whose B x B logits add 2*B*embed_dim per sample for the global batch B."""
    return TRAIN_MULTIPLIER * forward_flops(model_cfg, training=True)["total"]


def loss_flops_per_sample(model_cfg: ConfigDict, global_batch: int) -> float:
    """Forward + backward FLOPs of the contrastive logits per sample at batch B."""
    return TRAIN_MULTIPLIER * 2.0 * global_batch * model_cfg.embed_dim
