"""The GPU paths, on a machine that has one: codes equal to fairseq's (TF32 off for the quantizer),
every extraction step and a bf16 training run on CUDA. Without CUDA there is nothing to check;
the same behaviour on the CPU is tested in the other modules."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import main
from mmser import speech_encoders
from fixtures import tiny_models
from mmser import train_function
from mmser.fairseq_checkpoints import load_vq_wav2vec
from test_fairseq_loading import CASES, REF, VQ_FILES
from mmser import extraction, steps
from mmser import distributed, runner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("checkpoint", VQ_FILES)
def test_cuda_codes_equal_fairseq_and_cpu(checkpoint, precision_settings):
    reference = torch.load(REF / "vq_wav2vec_reference.pt", weights_only=True)[checkpoint]
    model = load_vq_wav2vec(REF / checkpoint).to("cuda")
    # TF32 for every matmul and convolution, as transformers' enable_tf32 sets it: codes() must
    # switch it off where it matters.
    torch.backends.fp32_precision = "tf32"
    for case in CASES:
        assert torch.equal(model.codes(reference[case]["wav"].numpy()), reference[case]["idx"]), case


def test_extraction_and_bf16_training_on_cuda(demo_run, tmp_path):
    """Every extraction step on the GPU gives the CPU's features; a demo run trains under bf16."""
    run_dir = demo_run[0]
    data_dir = tmp_path / "data"
    shutil.copytree(run_dir / "data", data_dir)
    for step in steps.EXTRACTORS:
        report = steps.run_step(step, data_dir, run_dir / "models", device="cuda", overwrite=True, progress=False)
        assert report.ok, extraction.format_summary([report])
    for name in sorted((run_dir / "data" / "vqw2vTokens").glob("*.npy"))[:50]:
        assert np.array_equal(np.load(name), np.load(data_dir / "vqw2vTokens" / name.name)), name.name
    for name in sorted((run_dir / "data" / "BertEmb").glob("*.npy"))[:50]:
        # The demo's tiny sentence model is calibrated to unit-variance outputs, which scales
        # rounding differences between GPU and CPU kernels up by about 300.
        np.testing.assert_allclose(np.load(name), np.load(data_dir / "BertEmb" / name.name), atol=1e-3)
    args = main.parse_args(["--demo", tmp_path / "run", "--device", "cuda", "--epochs", "3"])
    args.data_dir, args.models_dir = str(run_dir / "data"), str(run_dir / "models")
    results = runner.train_and_test(args)
    assert results["summary"]["ua_mean"] > 0.25
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["device"], config["precision"]) == ("cuda", "bf16")


def test_cpu_side_collectives_work_beside_nccl(tmp_path):
    """Under torchrun on GPUs, the loss check and the gathered losses and predictions are CPU
    collectives, which NCCL alone refuses ("No backend type associated with device type cpu")."""
    torch.cuda.set_device(0)
    dist.init_process_group(distributed.process_group_backend(cuda=True), store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        train_function._check_finite(1.0, "loss", distributed=True)
        with pytest.raises(train_function.NonFiniteLossError):
            train_function._check_finite(float("nan"), "loss", distributed=True)
        loss = torch.tensor([2.0])
        dist.all_reduce(loss)
        shares = [None]
        dist.all_gather_object(shares, {7: torch.ones(3)})
        on_gpu = torch.ones(2, device="cuda")
        dist.all_reduce(on_gpu)
        assert loss.item() == 2.0 and torch.equal(shares[0][7], torch.ones(3)) and on_gpu.sum().item() == 2.0
    finally:
        dist.destroy_process_group()


def test_speech_encoder_layer_means_on_cuda_are_the_cpu_s_and_fine_tuning_runs_under_bf16(tmp_path, precision_settings):
    """Layer means in fp32 on the GPU (TF32 switched on for the rest of the process, as transformers'
    enable_tf32 sets it) equal the CPU's; the fine-tuning path trains a step under bf16 autocast."""
    from mmser.dataset_loader import collate_utterances
    torch.backends.fp32_precision = "tf32"
    wav = (0.1 * np.random.default_rng(0).standard_normal(40000)).astype(np.float32)
    for family in ("wavlm", "whisper"):
        folder = tiny_models.make_tiny_speech_encoder(tmp_path / family, family)
        on_cpu = speech_encoders.layer_means(speech_encoders.load_speech_model(folder), wav)
        on_gpu = speech_encoders.layer_means(speech_encoders.load_speech_model(folder, "cuda"), wav)
        np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-4, rtol=0)
    branch = speech_encoders.layer_sum_branch(tmp_path / "wavlm", finetune=True, gradient_checkpointing=True)
    branch = branch.to("cuda").train()
    speech = speech_encoders.load_speech_model(tmp_path / "wavlm")
    batch = collate_utterances([{"index": i, "name": str(i), "label": 0,
                                 "speech_wave": torch.from_numpy(speech_encoders.waveform_input(speech, wav[:n]))}
                                for i, n in enumerate((16000, 40000))])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        vectors = branch(wave=batch["speech_wave"].cuda(), wave_mask=batch["speech_wave_mask"].cuda())
    vectors.float().pow(2).mean().backward()
    assert vectors.shape == (2, 32) and torch.isfinite(branch.layer_logits.grad).all()
