"""Today's speech encoders (speech_encoders.py) as the speech branch: a tiny WavLM folder made elsewhere
goes through extraction, training with the speech branch alone and predict.py; every family's layer
means are transformers' own hidden states, averaged; the fine-tuning path gives the cached vector."""
import contextlib
import io
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import transformers

from mmser import data_contract
import feature_ext
import main
from mmser import encoder_speedups, speech_encoders
from mmser.speech.routes import route_of, speech_models
from fixtures import tiny_models
from mmser.dataset_loader import collate_utterances
from mmser.utils import torch_threads
from small_runs import fold_result, run_like_the_demo
from test_predict import assert_session5_predictions_equal_the_evaluation


def own_hidden_state_means(folder, wav):
    """What transformers itself gives for one utterance: every hidden state, averaged over the frames."""
    model = transformers.AutoModel.from_pretrained(folder).eval()
    extractor = transformers.AutoFeatureExtractor.from_pretrained(folder)
    with torch.no_grad(), warnings.catch_warnings():
        # transformers' WavLM mixes a boolean and a float mask, which torch warns about (not ours to fix)
        warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask", category=UserWarning)
        inputs = extractor(wav, sampling_rate=16000, return_tensors="pt")
        states = model(**inputs, output_hidden_states=True).hidden_states
    return np.stack([h[0].mean(0).numpy() for h in states])


def wavs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def test_the_speech_branch_reads_one_folder_per_encoder_and_names_its_files():
    models = speech_models("/elsewhere/my-wavlm")
    assert data_contract.branch_steps("speech", 2, models) == ["speech-layers@my-wavlm"]
    hub = speech_models("microsoft/wavlm-large")
    assert data_contract.feature_path("D", "speech", "7_s_1_neu", 2, hub).as_posix() == \
        "D/SpeechLayers-microsoft--wavlm-large/7_s_1_neu.npy"
    assert data_contract.pretrained_roles("speech", hub) == ["speech_model", "speech_encoder"]
    # the original route keeps its names, a bert_kmeans.pt given or not
    for given in ("models/bert_kmeans/bert_kmeans.pt", None):
        assert data_contract.branch_steps("speech", 2, speech_models(given)) == ["speech-tokens"]
        assert data_contract.pretrained_roles("speech", speech_models(given)) == \
            ["speech_model", "vq_wav2vec", "speech_dictionary"]
    # a fine-tuned encoder reads the waveforms, and the cached layer means otherwise
    assert route_of("microsoft/wavlm-large", finetune=True).input_file("D", "7").as_posix() == "D/Audio/7.wav"
    assert route_of("microsoft/wavlm-large").input_file("D", "7").as_posix() == \
        "D/SpeechLayers-microsoft--wavlm-large/7.npy"


def test_a_wavlm_folder_made_elsewhere_goes_through_extraction_training_and_predict(demo, tmp_path):
    folder = tiny_models.make_tiny_speech_encoder(tmp_path / "elsewhere" / "my-wavlm", "wavlm", seed=0)
    data_dir = tmp_path / "data"  # the demo's corpus, without its features
    data_dir.mkdir()
    shutil.copy(demo["data_dir"] / "utterances.csv", data_dir)
    shutil.copytree(demo["data_dir"] / "Audio", data_dir / "Audio")
    # with two CPU threads, as two workers of one thread each (speech_encoders.layer_means_of_batches)
    with contextlib.redirect_stdout(io.StringIO()), torch_threads(2):
        assert speech_encoders.extraction_workers(speech_encoders.load_speech_model(folder)) == 2
        assert feature_ext.main(["speech-layers", str(data_dir), str(demo["run_dir"] / "models"),
                                 "--speech-model", str(folder), "--threads", "2"]) == 0
    out = data_dir / "SpeechLayers-my-wavlm"
    written = sorted(out.glob("*.npy"))
    assert len(written) == len(list((data_dir / "Audio").glob("*.wav")))
    from mmser.utils import read_audio
    for path in written[:3]:
        cached = np.load(path)
        assert cached.dtype == np.float32 and cached.shape == (3, 32)
        expected = own_hidden_state_means(folder, read_audio(data_dir / "Audio" / f"{path.stem}.wav")[0])
        np.testing.assert_allclose(cached, expected, rtol=0, atol=1e-5)
    record = json.loads((data_dir / "features.json").read_text())["speech-layers@my-wavlm"]["speech_encoder"]
    assert record["path"] == str(folder.resolve()) and len(record["sha256"]) == 64

    run_dir = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        results = main.main([run_dir, data_dir, demo["run_dir"] / "models", 2, 64, 310, "--epochs", 15,
                             "--batch-size", 16, "--lr-head", 2e-3, "--seed", 0, "--device", "cpu",
                             "--branches", "speech", "--speech-model", folder])
    assert results["summary"]["ua_mean"] > 0.35  # chance 0.25
    weights = fold_result(run_dir)["speech_layer_weights"]
    assert len(weights) == 3 and sum(weights) == pytest.approx(1) and weights != [1 / 3] * 3
    assert (run_dir / "fold1" / "speech_layers.png").stat().st_size > 0
    assert_session5_predictions_equal_the_evaluation(run_dir, data_dir, tmp_path)

    # Fine-tuned, the encoder reads the waveforms: no layer means need extracting first.
    shutil.rmtree(out)
    (data_dir / "features.json").unlink()
    finetuned = tmp_path / "finetuned"
    with contextlib.redirect_stdout(io.StringIO()):
        main.main([finetuned, data_dir, demo["run_dir"] / "models", 2, 64, 310, "--epochs", 1, "--batch-size", 16,
                   "--seed", 0, "--device", "cpu", "--branches", "speech", "--speech-model", folder,
                   "--finetune-speech"])
    config = json.loads((finetuned / "config.json").read_text())
    assert config["pretrained"]["speech_encoder"] == config["pretrained"]["speech_model"]
    assert_session5_predictions_equal_the_evaluation(finetuned, data_dir, tmp_path)


@pytest.mark.parametrize("family", ["hubert", "wav2vec2", "data2vec-audio"])
def test_every_family_s_layer_means_are_transformers_own_hidden_states_means(family, tmp_path):
    folder = tiny_models.make_tiny_speech_encoder(tmp_path / family, family)
    speech = speech_encoders.load_speech_model(folder)
    assert speech.kind == family and speech.takes_attention_mask == (family != "wav2vec2")
    assert encoder_speedups.knows_front_end(speech.encoder)  # the time-major front end is what ran
    for wav in wavs([4000, 9000]):
        np.testing.assert_allclose(speech_encoders.layer_means(speech, wav), own_hidden_state_means(folder, wav),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["wavlm", "hubert", "wav2vec2", "data2vec-audio"])
def test_the_time_major_front_end_is_transformers_feature_encoder(family, tmp_path):
    encoder = speech_encoders.load_speech_model(tiny_models.make_tiny_speech_encoder(tmp_path / family, family)).encoder
    # the tiny models' kernels are the real ones: 10 over 5 (unfolded), 3 over 2 (per tap), 2 over 2;
    # wav2vec 2.0's group norm is folded into the first layer's weights: also over a DC offset (no
    # normalisation before it), and over more frames than one block of the first two layers
    for wav in wavs([400, 4321, 16000]) + [wavs([24000], seed=2)[0] + 0.3]:
        with torch.inference_mode():
            own = encoder.feature_extractor(torch.from_numpy(wav)[None])[0].t()
            time_major = encoder_speedups.time_major_front_end(encoder.feature_extractor, torch.from_numpy(wav))
        assert time_major.shape == own.shape
        torch.testing.assert_close(time_major, own, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", tiny_models.TINY_SPEECH_FAMILIES)
def test_a_batch_s_layer_means_are_each_utterance_s_alone_and_only_where_padding_changes_nothing(family, tmp_path):
    speech = speech_encoders.load_speech_model(tiny_models.make_tiny_speech_encoder(tmp_path / family, family))
    # a layer-norm front end with attention masks, and Whisper's windows: any lengths; group norm
    # (wav2vec 2.0 base-like) and data2vec-audio's stacked positional convolutions: equal lengths only
    assert speech.pads_freely == (family in ("wavlm", "hubert", "whisper"))
    different = wavs([16000, 12345, 9000] + ([31 * 16000 + 100] if family == "whisper" else []), seed=1)
    alone = [speech_encoders.layer_means(speech, wav) for wav in different]
    if speech.pads_freely:
        batched = speech_encoders.batch_layer_means(speech, different)
    else:
        with pytest.raises(ValueError, match="equal length"):
            speech_encoders.batch_layer_means(speech, different)
        batched = speech_encoders.batch_layer_means(speech, [different[0], different[0][::-1].copy()])[:1]
    for one, many in zip(alone, batched):
        np.testing.assert_allclose(many, one, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["wavlm", "hubert", "wav2vec2"])
def test_the_frozen_stand_ins_compute_transformers_own_hidden_states_and_are_put_back(family, tmp_path):
    speech = speech_encoders.load_speech_model(tiny_models.make_tiny_speech_encoder(tmp_path / family, family))
    encoder = speech.encoder
    lengths = [16000, 11000] if speech.pads_freely else [16000, 16000]  # padded, with its mask
    inputs = speech.feature_extractor(wavs(lengths), sampling_rate=16000, return_tensors="pt", padding=True,
                                      return_attention_mask=True)
    mask = inputs.attention_mask if speech.takes_attention_mask else None
    front_end, positional = encoder.feature_extractor, encoder.encoder.pos_conv_embed
    with torch.inference_mode():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
            own = encoder(inputs.input_values, attention_mask=mask, output_hidden_states=True).hidden_states
        with encoder_speedups.faster(encoder), warnings.catch_warnings():
            warnings.simplefilter("error")  # the attention's padding mask goes in as torch wants it
            assert type(encoder.feature_extractor).__name__ == "_TimeMajorFeatureEncoder"
            assert type(encoder.encoder.pos_conv_embed).__name__ == "_ChannelsLastPositionalConv"
            attentions = [m for m in encoder.modules() if type(m).__name__ == "WavLMAttention"]
            assert bool(attentions) == (family == "wavlm")
            assert all("torch_multi_head_self_attention" in vars(m) for m in attentions)
            fast = encoder(inputs.input_values, attention_mask=mask, output_hidden_states=True).hidden_states
    frames = encoder._get_feat_extract_output_lengths(torch.tensor(lengths))
    for a, b in zip(own, fast):
        for row, n in enumerate(frames):
            torch.testing.assert_close(b[row, :n], a[row, :n], rtol=0, atol=1e-5)
    assert encoder.feature_extractor is front_end and encoder.encoder.pos_conv_embed is positional
    assert not any("torch_multi_head_self_attention" in vars(m) for m in encoder.modules())


def test_several_batches_at_once_on_one_thread_each_give_each_batch_s_layer_means_in_order(tmp_path):
    speech = speech_encoders.load_speech_model(tiny_models.make_tiny_speech_encoder(tmp_path / "wavlm", "wavlm"))
    batches = [(f"batch{k}", wavs(lengths, seed=k)) for k, lengths in
               enumerate([[16000], [9000, 8800], [3000], [20000, 19000, 19500], [5000]])]
    threads = torch.get_num_threads()
    together = list(speech_encoders.layer_means_of_batches(speech, iter(batches), workers=2))
    assert [key for key, _ in together] == [key for key, _ in batches]
    for (_, means), (_, batch) in zip(together, batches):
        np.testing.assert_allclose(means, speech_encoders.batch_layer_means(speech, batch), rtol=0, atol=1e-6)
    assert torch.get_num_threads() == threads
    # a batch that fails says so in the caller's thread, and the thread setting is put back
    with pytest.raises(ValueError, match="too short"):
        list(speech_encoders.layer_means_of_batches(speech, iter([("a", wavs([8000])), ("b", wavs([100]))]), 2))
    assert torch.get_num_threads() == threads


def test_length_batches_sort_by_length_cap_the_padding_and_keep_group_norm_to_equal_lengths():
    from mmser.speech.layers import MAX_PADDING, length_batches

    class Speech:  # what length_batches reads of a speech_encoders.SpeechModel
        def __init__(self, kind, pads_freely):
            self.kind, self.pads_freely = kind, pads_freely

    items = [(name, n) for name, n in [("a", 48000), ("b", 16000), ("c", 47000), ("d", 16000), ("e", 2_000_000),
                                       ("f", 17000), ("g", 46000)]]
    free = length_batches(items, Speech("wavlm", True), batch_seconds=10)
    assert [[name for name, _ in batch] for batch in free] == [["b", "d", "f"], ["g", "c", "a"], ["e"]]
    for batch in free:
        longest = max(n for _, n in batch) * len(batch)
        assert longest - sum(n for _, n in batch) <= MAX_PADDING * longest
    equal = length_batches(items, Speech("wav2vec2", False), batch_seconds=10)
    assert [[name for name, _ in batch] for batch in equal] == [["b", "d"], ["f"], ["g"], ["c"], ["a"], ["e"]]
    # Whisper: 30 s of padded audio a window; 120 s is four windows, whatever the lengths in them
    windows = length_batches([(i, 16000 * s) for i, s in enumerate([1, 2, 29, 31, 3])], Speech("whisper", True), 120)
    assert [[i for i, _ in batch] for batch in windows] == [[0, 1, 4, 2], [3]]


def test_whisper_s_layer_means_count_only_the_frames_over_audio_window_by_window(tmp_path):
    folder = tiny_models.make_tiny_speech_encoder(tmp_path / "whisper", "whisper")
    speech = speech_encoders.load_speech_model(folder)  # a whole WhisperModel folder: its encoder only
    assert speech.kind == "whisper" and type(speech.encoder).__name__ == "WhisperEncoder"
    wav = wavs([31 * 16000 + 100])[0]  # two windows: 30 s, then 1.00625 s (ceil(16100 / 320) = 51 frames)
    encoder = transformers.WhisperModel.from_pretrained(folder).encoder.eval()
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(folder)
    frames = []
    with torch.no_grad():
        for window, n in ((wav[:480000], 1500), (wav[480000:], 51)):
            features = extractor(window, sampling_rate=16000, return_tensors="pt").input_features
            frames.append(torch.stack(encoder(features, output_hidden_states=True).hidden_states)[:, 0, :n])
    expected = torch.cat(frames, dim=1).mean(1).numpy()
    np.testing.assert_allclose(speech_encoders.layer_means(speech, wav), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family, lengths", [("wavlm", [3000, 8000, 5200]),
                                             ("whisper", [3000, 30 * 16000 + 4000, 5200])])  # 2 windows
def test_the_fine_tuning_path_frozen_and_in_eval_mode_gives_the_cached_vector(family, lengths, tmp_path):
    folder = tiny_models.make_tiny_speech_encoder(tmp_path / family, family)
    branch = route_of(folder, finetune=True).branch()["speech_layer_sum"]  # the path --finetune-speech takes
    speech = speech_encoders.load_speech_model(folder)
    utterances = [{"index": i, "name": str(i), "label": 0,
                   "speech_wave": torch.from_numpy(speech_encoders.waveform_input(speech, w))}
                  for i, w in enumerate(wavs(lengths))]
    cached = torch.stack([torch.from_numpy(speech_encoders.layer_means(speech, w)) for w in wavs(lengths)])
    branch = branch.eval().requires_grad_(False)
    with torch.no_grad():
        branch.layer_logits.copy_(torch.tensor([0.3, -1.0, 0.5]))
        batch = collate_utterances(utterances)  # zero-padded to the longest, with the mask
        pooled = branch(wave=batch["speech_wave"], wave_mask=batch["speech_wave_mask"])
        assert torch.allclose(pooled, branch(layers=cached), atol=1e-4, rtol=0)


def test_a_model_that_is_not_a_speech_encoder_is_refused_saying_what_it_is(demo, tmp_path):
    bert = demo["run_dir"] / "models" / "bert-base-uncased"
    with pytest.raises(speech_encoders.SpeechModelError, match="model_type 'bert'"):
        speech_encoders.speech_kind(bert)
    with pytest.raises(SystemExit, match="--speech-model: .*model_type 'bert'"):
        run_like_the_demo(demo["run_dir"], tmp_path / "run", "--branches", "speech", "--speech-model", bert)
