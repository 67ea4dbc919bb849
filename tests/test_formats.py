"""The data people have: OpenAI chat fine-tuning files in full as far as text goes (text parts, names, the
developer role; tools refused line by line) and TRL's conversational prompt/completion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardtune.dataset import validate_dataset
from guardtune.policy import load_policy
from guardtune.records import iter_records
from guardtune.templates import to_messages


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def openai(i: int, **changes) -> dict:
    record = {"messages": [
        {"role": "developer", "content": "You are a helpful support agent."},
        {"role": "user", "content": [{"type": "text", "text": f"My order {i} is late."},
                                     {"type": "text", "text": "What can I do?"}], "name": "customer"},
        {"role": "assistant", "content": f"Sorry about order {i}: I have asked the courier for an update."}]}
    record.update(changes)
    return record


def no_screen(tmp_path: Path, **dataset) -> str:
    extra = "".join(f", {k}: {v}" for k, v in dataset.items())
    path = tmp_path / "policy.yaml"
    path.write_text(f"version: 'fmt-1'\ninclude: default\ndataset: {{screen: {{enabled: false}}{extra}}}\n")
    return str(path)


def test_openai_chat_with_text_parts_names_and_developer_validates_and_normalises(tmp_path):
    path = write(tmp_path / "openai.jsonl", [openai(i) for i in range(12)])
    report = validate_dataset(path, no_screen(tmp_path), screen=False)
    assert report.valid, report.issues[:3]
    assert report.counts_by_code["name-dropped"] == 12  # one warning per line that had a name
    (_, messages), *_ = iter_records(path, sha256=report.sha256)
    assert messages == [{"role": "system", "content": "You are a helpful support agent."},
                        {"role": "user", "content": "My order 0 is late.\nWhat can I do?"},
                        {"role": "assistant",
                         "content": "Sorry about order 0: I have asked the courier for an update."}]
    kept = list(iter_records(path, message_names="keep"))[0][1]
    assert kept[1]["name"] == "customer"
    refused = validate_dataset(path, no_screen(tmp_path, message_names="refuse"), screen=False)
    assert not refused.valid and refused.counts_by_code["message-name"] == 12
    first = next(i for i in refused.issues if i.code == "message-name")
    assert first.line == 1 and first.path == "/messages/1/name"


def test_tools_tool_turns_and_non_text_parts_are_refused_each_with_its_line(tmp_path):
    records = [openai(i) for i in range(12)]
    records[2] = openai(2, tools=[{"type": "function", "function": {"name": "lookup"}}])
    records[5]["messages"].insert(2, {"role": "assistant", "content": None,
                                      "tool_calls": [{"id": "c1", "type": "function"}]})
    records[5]["messages"].insert(3, {"role": "tool", "content": "shipped", "tool_call_id": "c1"})
    records[8]["messages"][1]["content"].append({"type": "image_url", "image_url": {"url": "https://x/y.png"}})
    report = validate_dataset(write(tmp_path / "tools.jsonl", records), no_screen(tmp_path), screen=False)
    by_code = {(i.code, i.line) for i in report.issues if i.severity == "error"}
    assert {("unsupported-tools", 3), ("unsupported-tool-turn", 6), ("unsupported-content-part", 9)} <= by_code
    assert report.n_records == 9 and not report.valid
    image = next(i for i in report.issues if i.code == "unsupported-content-part")
    assert "image_url" in image.message and image.path == "/messages/1/content"


def test_trl_conversational_prompt_completion_trains_only_the_completion(tmp_path):
    record = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello! How can I help?"},
                         {"role": "user", "content": "What are your hours?"}],
              "completion": [{"role": "assistant", "content": "We are open 9 to 5, Monday to Friday."}]}
    assert to_messages(record) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello! How can I help?", "weight": 0},
                                   {"role": "user", "content": "What are your hours?"},
                                   {"role": "assistant", "content": "We are open 9 to 5, Monday to Friday."}]
    rows = [json.loads(json.dumps(record).replace("hours", f"hours on day {i}")) for i in range(12)]
    report = validate_dataset(write(tmp_path / "trl.jsonl", rows), no_screen(tmp_path), screen=False)
    assert report.valid and report.format == "prompt_completion", report.issues[:3]
    bad = [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "user", "content": "Hey"}]}] * 12
    broken = validate_dataset(write(tmp_path / "bad.jsonl", bad), no_screen(tmp_path, duplicates="ignore"),
                              screen=False)
    assert not broken.valid and broken.counts_by_code["role-order"] == 12


def test_the_train_stage_reads_names_the_way_the_policy_says(tiny_model_dir, tmp_path):
    from guardtune.training import train

    path = write(tmp_path / "openai.jsonl", [openai(i) for i in range(12)])
    result = train(path, load_policy(no_screen(tmp_path, message_names="keep")), tmp_path / "run",
                   model=str(tiny_model_dir), validated=True, max_steps=1, batch_size=4)
    assert result.metrics["n_examples"] == 12


@pytest.mark.parametrize("content", [[], [{"type": "text"}], [{"type": "text", "text": 3}]])
def test_malformed_text_parts_are_schema_errors(tmp_path, content):
    records = [openai(i) for i in range(12)]
    records[0]["messages"][1]["content"] = content
    report = validate_dataset(write(tmp_path / "d.jsonl", records), no_screen(tmp_path), screen=False)
    assert [i.line for i in report.issues if i.severity == "error"] == [1]
