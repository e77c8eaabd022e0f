"""`python -m fusedtrain sae train` end to end on a tiny random model with a word-level tokenizer saved
next to it (built here with `tokenizers`, no downloads), and the activation stream it trains on
against the model's own hidden states."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from fusedtrain.__main__ import main as cli  # noqa: E402
from fusedtrain.integrations.activations import (find_hookpoint, shuffled_batches,  # noqa: E402
                                                 stream_activations)
from fusedtrain.sae import SparseAutoencoder  # noqa: E402
from utils import rel_err  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]"]
THETA = "0.01"  # --theta of the threshold routing run (at 0.05 this tiny run learns too slowly to pass the 0.8 FVU bar in 40 steps)




def save_tokenizer(folder):
    """A whitespace word-level tokenizer that prepends [BOS] (a special token the stream drops)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                bos_token="[BOS]")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    config = transformers.LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaModel(config).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    lines = [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (int(n),)).tolist())
             for n in torch.randint(3, 25, (24,))]
    lines[5] = ""  # empty lines are skipped
    path = tmp_path / "text.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_stream_is_the_layer_output_at_real_tokens(model_folder, text_file):
    model = transformers.AutoModel.from_pretrained(model_folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_folder)
    name, module = find_hookpoint(model, layer=1)
    assert name == "layers.1"
    assert find_hookpoint(model, layer=-1)[0] == "layers.2"
    rows = list(stream_activations(model, module, tokenizer, str(text_file), seq_len=12, batch_lines=7, epochs=1))
    expected = []
    for line in text_file.read_text().splitlines():
        if not line:
            continue
        ids = tokenizer(line)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        for start in range(0, len(ids) - 1, 11):  # rows of 12: BOS + 11 words (the BOS is dropped)
            chunk = torch.tensor([[tokenizer.bos_token_id] + ids[1:][start:start + 11]])
            with torch.no_grad():
                hidden = model(chunk, output_hidden_states=True).hidden_states[2]  # after block 1
            expected.append(hidden[0, 1:])
    got, want = torch.cat(rows), torch.cat(expected)
    assert got.shape == want.shape and rel_err(got, want) < 1e-5
    batches = list(shuffled_batches(iter(rows * 5), batch_tokens=50, buffer_batches=2))
    assert batches and all(b.shape == (50, 16) for b in batches)


def test_find_hookpoint_errors_name_the_option(model_folder):
    model = transformers.AutoModel.from_pretrained(model_folder)
    with pytest.raises(ValueError, match=r"layer must be in \[-3, 3\)"):
        find_hookpoint(model, layer=3)
    with pytest.raises(ValueError, match="hookpoint 'layers.9' is not a module"):
        find_hookpoint(model, hookpoint="layers.9")
    assert find_hookpoint(model, hookpoint="norm")[0] == "norm"


@pytest.mark.parametrize("routing", ["topk", "mutual_choice", "threshold"])
def test_sae_train_writes_a_trained_sae(model_folder, text_file, tmp_path, capsys, routing):
    out = tmp_path / "sae"
    code = cli(["sae", "train", "--model", str(model_folder), "--layer", "1", "--text", str(text_file),
                "--num-latents", "48", "--k", "4", "--steps", "40", "--batch-tokens", "64", "--lr", "3e-3",
                "--log-every", "20", "--dead-tokens", "200", "--out", str(out), "--device", "cpu",
                "--routing", routing] + (["--theta", THETA] if routing == "threshold" else []))
    assert code == 0
    printed = capsys.readouterr().out
    progress = [line for line in printed.splitlines() if line.startswith("step ")]
    assert len(progress) == 2 and all("fvu" in p and "dead" in p and "tokens/s" in p for p in progress)
    sae = SparseAutoencoder.load_from_disk(out)
    assert (sae.d_in, sae.num_latents, sae.routing, sae.k) == (16, 48, routing, 4)
    assert (sae.threshold_steps.item() == 40) == (routing == "mutual_choice")  # its thresholds were learned and kept
    assert sae.dead_tokens_threshold == 200
    if routing == "threshold":  # its fixed theta, kept in the threshold buffer
        assert torch.equal(sae.threshold, torch.full((48,), float(THETA)))
    training = json.loads((out / "cfg.json").read_text())["fusedtrain"]["metadata"]["training"]
    assert training["hookpoint"] == "layers.1" and training["tokens"] == 40 * 64
    assert training["final_fvu"] < 0.8 * training["first_fvu"]  # it learned something
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)


def test_cli_refuses_bad_arguments(model_folder, text_file, tmp_path):
    base = ["sae", "train", "--model", str(model_folder), "--text", str(text_file), "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="2"):
        cli(base)  # neither --layer nor --hookpoint
    with pytest.raises(SystemExit, match="2"):
        cli(base + ["--layer", "0", "--steps", "0"])
    with pytest.raises(SystemExit, match=r"layer must be in"):
        cli(base + ["--layer", "7"])
    with pytest.raises(SystemExit, match="2"):
        cli(base + ["--layer", "0", "--routing", "threshold"])  # no --theta
    with pytest.raises(SystemExit, match="2"):
        cli(base + ["--layer", "0", "--theta", "0.1"])  # --theta without threshold routing
    with pytest.raises(SystemExit, match="2"):
        cli(base + ["--layer", "0", "--routing", "threshold", "--theta", "nan"])
    assert cli(["sae", "fit"]) == 2


def test_module_entry_point_reaches_the_command():
    done = subprocess.run([sys.executable, "-m", "fusedtrain", "sae", "train", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--batch-tokens" in done.stdout and "--routing" in done.stdout
