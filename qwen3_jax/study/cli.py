"""`qwen3-jax study attention|patching|lens|layers`: one picture of a study, written to a PNG file."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from qwen3_jax.arguments import debug_parent
from qwen3_jax.checks import UsageError

PICTURES = ("attention", "patching", "lens", "layers")


def add_study_parser(commands) -> None:
    """The `study` sub-command, added to build_parser's sub-parsers."""
    study = commands.add_parser("study", parents=[debug_parent()],
                                help="a picture of what the model does: attention maps, activation "
                                "patching, the logit lens, per-layer curves (docs/study.md)")
    study.add_argument("picture", choices=PICTURES)
    study.add_argument("--model", required=True, help="checkpoint folder or hub id")
    study.add_argument("--reranker", action="store_true", help="a Qwen3-Reranker: --text are documents for --query")
    study.add_argument("--text", nargs="+", required=True,
                       help="texts (a reranker's documents); attention, patching and lens draw the first")
    study.add_argument("--query", default=None,
                       help="the reranker's query; layers of an embedder: each text's score against it per layer")
    study.add_argument("--instruction", default=None,
                       help="task instruction: of the query (embedder: of the texts when there is no --query)")
    study.add_argument("--corrupted", default=None,
                       help="patching: the corrupted text (or document), as many tokens as the first --text")
    study.add_argument("--kind", default="resid_pre",
                       help="patching: the activation put in (resid_pre, resid_mid, resid_post, attn_out, mlp_out, z)")
    study.add_argument("--layer", type=int, default=None, help="attention: the layer drawn (default: the last)")
    study.add_argument("--output", required=True, help="the picture: a .png file")
    study.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="compute dtype (float32: equal to transformers' float32)")
    study.add_argument("--mesh", default=None, help="device mesh, e.g. data=4,model=2")


def _check(args) -> Path:
    output = Path(args.output)
    if output.suffix != ".png":
        raise UsageError(f"--output {output} must end in .png")
    if not output.parent.is_dir():
        raise UsageError(f"--output folder {output.parent} does not exist")
    if args.reranker and args.query is None:
        raise UsageError("a reranker's study needs --query (the --text are its documents)")
    if args.picture == "patching" and args.corrupted is None:
        raise UsageError("patching needs --corrupted: the same input with the part under study changed")
    return output


def run_study(args) -> None:
    """Loads the model, runs the study the picture needs, writes the PNG."""
    from qwen3_jax.sharding import mesh_of
    from qwen3_jax.study import pictures
    from qwen3_jax.study.hooked import HookedQwen3

    output = _check(args)
    model = HookedQwen3.from_pretrained(args.model, reranker=args.reranker, dtype=args.dtype,
                                        mesh=mesh_of(args.mesh))
    inputs = [(args.query, text) for text in args.text] if args.reranker else list(args.text)
    instruction = args.instruction if args.reranker or args.query is None else None
    if args.picture == "attention":
        _attention(model, inputs[0], instruction, args.layer, output)
    elif args.picture == "patching":
        _patching(model, inputs[0], (args.query, args.corrupted) if args.reranker else args.corrupted, instruction,
                  args.kind, output)
    elif args.picture == "lens":
        from qwen3_jax.study.lenses import logit_lens

        lens = logit_lens(model, [inputs[0]], top_k=1, instruction=instruction)
        length = int(lens.mask[0].sum())
        decode = model.tokenizer.tokenizer.decode
        top = [[decode([int(i)], skip_special_tokens=False) for i in layer[:length, 0]] for layer in lens.ids[0]]
        pictures.lens_table(top, lens.probs[0, :, :length, 0], model.to_str_tokens(inputs[0], instruction=instruction),
                            output)
    else:
        _layers(model, args, inputs, instruction, output)
    print(f"wrote the {args.picture} picture to {output}", file=sys.stderr)


def _attention(model, single, instruction, layer, output) -> None:
    from qwen3_jax.study.pictures import attention_maps

    layers = model.cfg.num_hidden_layers
    layer = layers - 1 if layer is None else layer
    if not 0 <= layer < layers:
        raise UsageError(f"--layer {layer} is outside 0..{layers - 1}")
    _, cache = model.run_with_cache([single], names_filter=f"blocks.{layer}.attn.hook_pattern", instruction=instruction)
    length = int(cache.mask[0].sum())
    pattern = np.asarray(cache["pattern", layer][0, :, :length, :length])
    attention_maps(pattern, model.to_str_tokens(single, instruction=instruction), layer, output)


def _patching(model, clean, corrupted, instruction, kind, output) -> None:
    from qwen3_jax.study.interventions import patching_sweep
    from qwen3_jax.study.pictures import patching_heatmap

    try:
        grid = patching_sweep(model, clean, corrupted, kind=kind, instruction=instruction)
    except KeyError as err:
        raise UsageError(f"--kind {kind}: {err.args[0]}") from None
    metric = "yes-no margin" if model.answers else "cosine to the clean embedding"
    patching_heatmap(grid, model.to_str_tokens(clean, instruction=instruction), kind, metric, output)


def _layers(model, args, inputs, instruction, output) -> None:
    from qwen3_jax.study.lenses import layer_cosines, layer_scores, yes_no_margins
    from qwen3_jax.study.pictures import layer_curves

    if args.reranker:
        values, ylabel = yes_no_margins(model, inputs, instruction=instruction), "logit(yes) - logit(no)"
    elif args.query is not None:
        values = layer_scores(model, [args.query], inputs, instruction=args.instruction)[:, 0].T
        ylabel = "cosine to the query, per layer"
    else:
        values, ylabel = layer_cosines(model, inputs, instruction=instruction), "cosine to the final embedding"
    layer_curves(dict(zip(args.text, values)), ylabel, output)
