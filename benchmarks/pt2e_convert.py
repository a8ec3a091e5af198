"""Time the PT2E steps and compare our BN fold + convert with torchao's own convert.

    python benchmarks/pt2e_convert.py [--models resnet18 mobilenet_v2] [--size 32]

For each torchvision architecture (random init, 3x32x32 input, 10 classes): capture,
prepare_qat_pt2e (first in the process, then with the pattern captures cached), a
train -> eval switch, two QAT steps, then ``to_int8_module`` (our fold_bn, then
convert_pt2e with no BN left to match) against torchao's ``convert_pt2e`` on the same
prepared graph (its own BN folding), and the largest logit difference between the two.
"""

import argparse
import copy
import time

import torch
import torch.nn.functional as F
import torchvision

from compress.quant import QuantSpec, calibrate, quantize_model, set_qat_phase, to_int8_module


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args()
    import torchao.quantization.pt2e as pt2e
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    shape = (3, a.size, a.size)
    for name in a.models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10)
        _, t_capture = timed(lambda: torch.export.export(
            copy.deepcopy(model).train(), (torch.rand(2, *shape),),
            dynamic_shapes=({0: torch.export.Dim("batch")},)))
        q, t_prepare = timed(lambda: quantize_model(model, QuantSpec(), shape))
        _, t_prepare2 = timed(lambda: quantize_model(model, QuantSpec(), shape))
        calibrate(q, [torch.rand(16, *shape)])
        opt = torch.optim.SGD(q.parameters(), lr=0.01)
        for step in range(2):
            q.train()
            opt.zero_grad()
            F.cross_entropy(q(torch.rand(16, *shape)), torch.randint(0, 10, (16,))).backward()
            opt.step()
        set_qat_phase(q, observers=False, bn_stats=False)
        _, t_eval = timed(lambda: q.eval())
        x = torch.rand(256, *shape)
        with torch.no_grad():
            ref = q(x)
        ours, t_ours = timed(lambda: to_int8_module(q))

        def library():
            gm = copy.deepcopy(q.gm)
            pt2e.move_exported_model_to_eval(gm)
            with torch.no_grad():
                gm(torch.zeros(2, *shape))   # weight scales of the current weights
            for m in gm.modules():
                if isinstance(m, pt2e.FakeQuantize):
                    m.disable_observer()
            return convert_pt2e(gm)

        lib, t_lib = timed(library)
        with torch.no_grad():
            y_ours, y_lib = ours(x), lib(x)
        print(f"{name}: capture {t_capture:.1f} s, prepare {t_prepare:.1f} s (cached patterns "
              f"{t_prepare2:.1f} s), train->eval {t_eval:.2f} s, convert: ours {t_ours:.1f} s, "
              f"torchao {t_lib:.1f} s; max |ours - torchao| {float((y_ours - y_lib).abs().max()):.2e}, "
              f"max |ours - fake-quant| {float((y_ours - ref).abs().max()):.2e}; top-1 agreement "
              f"ours/fake-quant {float((y_ours.argmax(1) == ref.argmax(1)).float().mean()):.0%}, "
              f"ours/torchao {float((y_ours.argmax(1) == y_lib.argmax(1)).float().mean()):.0%}", flush=True)


if __name__ == "__main__":
    main()
