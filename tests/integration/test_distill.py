"""`tierserve models distill`: a short real run (vLLM data, CPU training) writes a checksummed draft
beside its target that loads with the target's vocabulary and beats its untrained start."""

import json
import subprocess
import sys

import pytest
import torch

from tierserve.actors.checkpoints import is_prepared, prepare_embedded, verify_checkpoint
from tierserve.actors.distill import (
    REPORT,
    TOPICS,
    Sample,
    draft_checkpoint_dir,
    init_layers,
    make_batches,
    prompt_set,
)

NAME = "smollm2-135m-instruct"


@pytest.mark.integration
def test_short_distill_writes_a_draft_that_beats_its_start(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # A cache holding links to the prepared target: the command finds it prepared and writes beside it.
    target = prepare_embedded(NAME, progress=False)
    linked = tmp_path / "models" / target.name
    linked.mkdir(parents=True)
    for f in target.iterdir():
        (linked / f.name).symlink_to(f)
    command = [sys.executable, "-m", "tierserve.cluster.cli", "models", "distill", NAME, "--cache-dir", str(tmp_path)]
    short = ["--prompts", "48", "--minutes", "0.75", "--max-new-tokens", "32"]

    run = subprocess.run(command + short, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    draft = draft_checkpoint_dir(linked)
    assert str(draft) in run.stdout and "held-out greedy acceptance" in run.stdout
    assert is_prepared(draft) and verify_checkpoint(draft) == []
    files = {p.name for p in draft.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", REPORT} <= files

    report = json.loads((draft / REPORT).read_text())
    assert (report["layers"], report["init_layers"]) == (4, [0, 1, 2, 29])
    assert report["train_prompts"] == 48 and report["held_out_prompts"] == len(prompt_set()[1])
    assert report["tokens_trained"] > 0 and report["acceptance_after"] > report["acceptance_before"]
    assert set(report["seconds"]) == {"generate", "build", "evaluate", "train", "write", "total"}

    model = AutoModelForCausalLM.from_pretrained(draft)
    assert model.config.num_hidden_layers == len(model.model.layers) == 4
    assert model.config.vocab_size == AutoConfig.from_pretrained(target).vocab_size
    assert AutoTokenizer.from_pretrained(draft).get_vocab() == AutoTokenizer.from_pretrained(target).get_vocab()

    # An existing draft is kept unless --force: the command refuses before generating anything.
    again = subprocess.run(command + short, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "--force" in again.stderr


def test_held_out_prompts_share_no_topic_with_training():
    train, held_out = prompt_set()
    held_topics = {t for t in TOPICS if any(t in p for p in held_out)}
    assert held_topics and not any(t in p for t in held_topics for p in train)
    assert prompt_set(10)[0] == train[:10]


def test_init_layers_keep_the_first_and_the_last():
    assert init_layers(30, 4) == [0, 1, 2, 29]
    assert init_layers(30, 1) == [29]
    with pytest.raises(ValueError, match="layers"):
        init_layers(30, 30)


def test_batches_line_each_completion_token_up_with_the_position_before_it():
    def sample(prompt, completion):
        k = torch.arange(2).repeat(len(completion), 1)
        return Sample(prompt, completion, k, torch.zeros(len(completion), 2))

    (batch,) = make_batches([sample([1, 2, 3], [4, 5]), sample([6], [7, 8, 9])], batch_sequences=2)
    # Shorter first; right-padded with 0; each True position's next token is the label.
    assert batch.input_ids.tolist() == [[6, 7, 8, 0], [1, 2, 3, 4]]
    assert batch.predicts.tolist() == [[True, True, True, False], [False, False, True, True]]
    assert batch.labels.tolist() == [7, 8, 9, 4, 5]
    assert batch.top_ids.shape == (5, 2)
