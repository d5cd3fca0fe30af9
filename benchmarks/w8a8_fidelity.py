"""W8A8 ``minmax`` on named tiny UNets, one range per quantizer vs per-timestep where it varies:
the table "W8A8 on UNets nobody tuned on" in docs/models.md.
Reproduces: docs/models.md, "W8A8 on UNets nobody tuned on".

    python benchmarks/w8a8_fidelity.py [--json runs/w8a8-fidelity.json]

Each UNet (the README's example, SD-, SDXL-like, class-conditional, LDM-like, and the two generated seeds that
lost most) is quantized from its own sampling loop (``tests/unet_zoo.py``) with ``timestep_ranges`` global and
auto; the relative MSE of the noise prediction is measured on held-out calls of the loop with other noise.
The auto model is also exported (int8) with the parity check; the top sensitivity entry of the global model
is printed (what carried the error).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from unet_zoo import ZooCase, build_unet, generate, held_out_calls, relative_error, sampling_loop  # noqa: E402

README = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4)
SD = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
          cross_attention_dim=16, attention_head_dim=4)
SDXL = dict(SD, use_linear_projection=True, transformer_layers_per_block=2, addition_embed_type="text_time",
            addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 24,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
CLASS = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
             down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
             num_class_embeds=10, attention_head_dim=8)
LDM = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
           down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
           up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
TEXT = dict(text_len=5, text_dim=16)


class ReadmeExample(ZooCase):
    """The README's "Quantize your own pipeline" UNet with the README's own loop (Euler with diffusers' default
    linear betas, fixed text embeddings, CFG 7.5 on the doubled batch), not the zoo's."""

    def loop(self, noise_seed: int):
        import torch
        from diffusers import EulerDiscreteScheduler

        text = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))

        def my_loop(unet):
            sched = EulerDiscreteScheduler(num_train_timesteps=1000)
            sched.set_timesteps(10)
            x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(noise_seed)) * sched.init_noise_sigma
            with torch.no_grad():
                for t in sched.timesteps:
                    u, c = unet(sched.scale_model_input(torch.cat([x, x]), t), t,
                                encoder_hidden_states=torch.cat([torch.zeros_like(text), text])).sample.chunk(2)
                    x = sched.step(u + 7.5 * (c - u), t, x).prev_sample
        return my_loop


def loop_of(case: ZooCase, noise_seed: int):
    return case.loop(noise_seed) if isinstance(case, ReadmeExample) else sampling_loop(case, noise_seed)


CASES = {
    "README's example with its own loop (Euler CFG 7.5)": ReadmeExample(0, "text-conditional", "UNet2DConditionModel", README,
                                                                       "EulerDiscreteScheduler", 10, 7.5, {}),
    "README's example, the zoo's Euler CFG 7.5 loop": ZooCase(0, "text-conditional", "UNet2DConditionModel", README,
                                                        "EulerDiscreteScheduler", 10, 7.5, dict(text_len=5, text_dim=12)),
    "SD-like, cross-attention down and up, Euler CFG 7.5": ZooCase(1, "text-conditional", "UNet2DConditionModel", SD,
                                                                  "EulerDiscreteScheduler", 10, 7.5, TEXT),
    "SD-like, DPM-Solver CFG 5": ZooCase(2, "text-conditional", "UNet2DConditionModel", SD, "DPMSolverMultistepScheduler", 10, 5.0, TEXT),
    "SDXL-like (text_time, linear proj, 2 layers), Euler CFG 5": ZooCase(3, "text_time (SDXL-like)", "UNet2DConditionModel", SDXL,
                                                                        "EulerDiscreteScheduler", 10, 5.0, dict(TEXT, text_embeds=8)),
    "class-conditional UNet2DModel, attention, DPM-Solver CFG 3": ZooCase(4, "class-conditional", "UNet2DModel", CLASS,
                                                                         "DPMSolverMultistepScheduler", 10, 3.0, dict(classes=10)),
    "3-level LDM-like UNet2DModel, attention, DDIM": ZooCase(5, "unconditional", "UNet2DModel", LDM, "DDIMScheduler", 10, None, {}),
    "generated seed 19": generate(19),
    "generated seed 39": generate(39),
}


def measure(name: str, case: ZooCase) -> dict:
    import gaq_backend as gaq
    from exporters.onnx_export import export_quantized

    calls = held_out_calls(case, build_unet(case), loop=loop_of(case, 1000))
    row: dict = dict(unet=name, case=case.describe())
    for mode in ("global", "auto"):
        config = gaq.QuantConfig(w_bits=8, a_bits=8, algorithm=gaq.MinMaxConfig(timestep_ranges=mode),
                                 calibration=gaq.CalibrationConfig(n_groups=min(5, case.steps)))  # the default 5, or one per step
        unet = build_unet(case)
        fp = gaq.float_weights(unet)
        q = gaq.quantize(unet, config, forward_loop=loop_of(case, 2), progress=False)
        row[mode] = relative_error(q, calls)
        row[f"{mode}_tables"] = sum(getattr(m, "timestep_ranges", None) is not None for m in q.modules())
        if mode == "global":
            top = gaq.layer_sensitivity(q, fp, progress=False).layers[0]
            row["global_top_layer"] = dict(name=top.name, share=top.share, act_alone=top.act_alone, weight_alone=top.weight_alone)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                gaq.save_quantized(q, os.path.join(tmp, "q"))
                p = export_quantized(os.path.join(tmp, "q"), os.path.join(tmp, "m.onnx"), "int8", progress=False).parity
            row["auto_parity"] = {k: p[k] for k in ("mean_steps", "max_steps")} | {"bounds": p["bounds"]}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--only", default="", help="only the UNets whose name contains this")
    args = ap.parse_args()
    rows = []
    print("| UNet (tiny, random) | global | auto (tables) | global's top layer (share) | auto int8 parity mean / max steps |")
    print("|---|---|---|---|---|")
    for name, case in CASES.items():
        if args.only not in name:
            continue
        r = measure(name, case)
        rows.append(r)
        top, par = r["global_top_layer"], r["auto_parity"]
        print(f"| {name} | {r['global']:.2%} | {r['auto']:.2%} ({r['auto_tables']}) | {top['name']} ({top['share']:.0%}) | "
              f"{par['mean_steps']:.3f} / {par['max_steps']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
