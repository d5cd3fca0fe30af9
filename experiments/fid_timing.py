"""Time 2,000 samples of the embedded FP model plus their Inception features and FID (issue 4's target).

    python experiments/fid_timing.py      # 2 threads, nothing else running; reference features cached first

The reference (first 2,000 MNIST test digits) is built or read from the cache before the clock starts.
"""
import time, json, torch
t0 = time.perf_counter()
from gaq_backend.pipeline import load_model_and_scheduler
from gaq_backend.config import SamplerConfig
from gaq_backend.evaluation.inception import InceptionFeatures
from gaq_backend.evaluation.fid_eval import sample_features, reference_features, reference_images, compare
unet, sched = load_model_and_scheduler("embedded")
net = InceptionFeatures()
REF = "../shared/data/mnist/t10k-images-idx3-ubyte.gz"
ref, info = reference_features(REF, *reference_images(REF, 32, 1, 2000), ".cache/gaq", net, False)
t1 = time.perf_counter()
fs, imgs, s_sample = sample_features(unet, sched, SamplerConfig(num_inference_steps=50), 2000, 0, 250, net, None, "fp", False)
m = compare(fs, ref)
t2 = time.perf_counter()
print(json.dumps(dict(threads=torch.get_num_threads(), sampling_s=s_sample, sample_plus_features_plus_fid_s=t2 - t1,
                      setup_s=t1 - t0, fid=m["fid"], sfid=m["sfid"], precision=m["precision"], recall=m["recall"], n=2000, ref=info)))
