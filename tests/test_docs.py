"""The README is a front page read whole (three methods, a contents list that works, a line limit), every method
has a demo, a recipe and an evaluation line there, and every link of the README and docs/*.md resolves."""

from __future__ import annotations

import json
import re
import shlex

import yaml

from conftest import REPO
from markdown_docs import anchor, anchors, bash_lines, documents, headings, links, read, resolve, section

README_LINE_LIMIT = 200
EVAL_PRESETS = ("vision-centric", "general", "knowledge", "ocr", "hallucination", "rah", "capability", "refusal",
                "demo")
METHODS = {  # stage -> (README heading starts with, how eval names what the run is compared with)
    "hera": ("HeRA:", "--baseline"),
    "rah": ("RAH-LoRA:", "--base"),
    "harc": ("HARC:", "--base"),
}


def _method_section(stage: str) -> str:
    readme = read("README.md")
    titles = [title for level, title in headings(readme) if level == 3 and title.startswith(METHODS[stage][0])]
    assert len(titles) == 1, f"the README needs one '### {METHODS[stage][0]} ...' section, has {titles}"
    return section(readme, titles[0])


def test_readme_is_a_front_page_under_the_line_limit() -> None:
    readme = read("README.md")
    lines = len(readme.splitlines())
    assert lines <= README_LINE_LIMIT, f"README.md has {lines} lines; move reference text into docs/"
    intro = readme.split("\n## ", 1)[0]
    for stage in METHODS:
        assert f"`stage: {stage}`" in intro, f"the README's first paragraph must name stage: {stage}"


def test_readme_contents_list_every_section_and_its_anchors_resolve() -> None:
    readme = read("README.md")
    contents = section(readme, "Contents")
    targets = re.findall(r"\]\((#[^)]+)\)", contents)
    assert targets, "the README's Contents list has no links"
    have = anchors(readme)
    assert [t for t in targets if t[1:] not in have] == [], "Contents links to headings that do not exist"
    listed = {t[1:] for t in targets}
    missing = [title for level, title in headings(readme) if level in (2, 3) and title != "Contents"
               and anchor(title) not in listed]
    assert missing == [], f"sections missing from Contents: {missing}"


def test_each_method_has_a_demo_a_recipe_and_an_eval_line() -> None:
    presets = set(re.findall(r"^\| `([\w-]+)` \|", section(read("docs/eval.md"), "Task presets"), flags=re.M))
    assert set(EVAL_PRESETS) <= presets, "docs/eval.md must list every preset"
    for stage, (_, compare) in METHODS.items():
        lines = bash_lines(_method_section(stage))
        assert f"python3 dev.py demo --method {stage}" in lines, stage
        # one-GPU recipes pin one GPU: a node's other GPUs would each start a rank
        pinned = "CUDA_VISIBLE_DEVICES=0 llamafactory-cli train recipes/"
        assert not [line for line in lines if line.startswith("llamafactory-cli train recipes/")], \
            f"{stage}: the README's one-GPU train lines start with CUDA_VISIBLE_DEVICES=0"
        trains = [shlex.split(line)[1:] for line in lines if line.startswith(pinned)]
        recipe_path = REPO / trains[0][2]
        assert recipe_path.is_file(), f"{stage}: {trains[0][2]} does not exist"
        recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
        assert recipe["stage"] == stage, f"{trains[0][2]} is not a stage: {stage} recipe"
        evals = [shlex.split(line) for line in lines if line.startswith("llamafactory-hera eval ")]
        assert len(evals) == 1, f"{stage}: one eval line, found {evals}"
        words = evals[0]
        assert words[2] == recipe["output_dir"], f"{stage}: eval reads {words[2]}, not {recipe['output_dir']}"
        assert compare in words and set(words[words.index("--tasks") + 1].split(",")) <= presets, words
        if compare == "--baseline":  # the twin: the same recipe as stage=sft into the folder eval compares with
            twin = words[words.index("--baseline") + 1]
            assert [*trains[0][:3], "stage=sft", f"output_dir={twin}"] in trains, f"{stage}: no twin line for {twin}"


def test_every_link_of_the_readme_and_the_docs_resolves() -> None:
    broken = []
    for source in documents():
        for target in links(read(source)):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            file, fragment = resolve(source, target)
            if not file.exists():
                broken.append((source, target, "no such file"))
            elif fragment and (file.suffix != ".md" or fragment not in anchors(file.read_text(encoding="utf-8"))):
                broken.append((source, target, "no such heading"))
    assert broken == []


def test_every_doc_is_linked_from_the_readme() -> None:
    linked = {resolve("README.md", target)[0] for target in links(read("README.md"))}
    assert [doc for doc in documents()[1:] if (REPO / doc).resolve() not in linked] == []


def test_every_repository_path_the_docs_name_exists() -> None:
    """Recipes, DeepSpeed configs, bench scripts and tests named anywhere in README.md and docs/*.md exist."""
    pattern = r"(?<![\w/.-])((?:recipes|bench|tests)/[\w./-]+\.(?:yaml|json|py|md))"
    named = {(source, path) for source in documents() for path in re.findall(pattern, read(source))}
    assert named, "no repository paths found: the pattern is broken"
    info = json.loads((REPO / "recipes" / "data" / "dataset_info.json").read_text(encoding="utf-8"))
    yours = {f"recipes/data/{entry['file_name']}" for entry in info.values() if "file_name" in entry}  # user's data
    assert [(source, path) for source, path in sorted(named) if not (REPO / path).is_file() and path not in yours] == []


def test_each_method_doc_lists_its_sections_at_the_top() -> None:
    for doc in ("docs/hera.md", "docs/rah.md", "docs/harc.md"):
        text = read(doc)
        first_section = text.index("\n## ")
        listed = set(re.findall(r"^- \[[^\]]+\]\(#([^)]+)\)$", text[:first_section], flags=re.M))
        sections = [title for level, title in headings(text) if level == 2]
        assert [title for title in sections if anchor(title) not in listed] == [], doc


PAPERS = {"docs/rah.md": '"RAH-LoRA: Training-Free Calibration of High-Influence Attention Heads in MLLMs", 2026, '
                         'under double-blind review',
          "docs/harc.md": '"HARC: Harmfulness-Refusal Coupling", arXiv 2607.00572, 2026'}


def test_method_docs_name_their_papers_not_the_projects_planning_words() -> None:
    """docs/rah.md and docs/harc.md opened with the project's planning words ("seed 004", "seed 003"): each names its
    paper in its first paragraph, and no document or docstring says "seed 00"."""
    for doc, paper in PAPERS.items():
        first = " ".join(read(doc).split("\n\n")[2].split())
        assert paper in first, (doc, first[:300])
    sources = [*documents(), *(str(p.relative_to(REPO)) for p in (REPO / "plugin").rglob("*.py"))]
    assert [path for path in sources if re.search(r"seed 00\d", read(path))] == []


def test_the_eval_presets_table_is_the_code() -> None:
    """docs/eval.md's presets table says what each preset holds and its prose names each preset's library tasks, as
    :mod:`llamafactory_hera.evaluation.presets` defines them."""
    from llamafactory_hera.evaluation.presets import DEMO, DEMO_HOLDS, PRESETS

    text = section(read("docs/eval.md"), "Task presets")
    rows = dict(re.findall(r"^\| `([\w-]+)` \| [^|\n]+ \| (.+) \|$", text, flags=re.M))
    holds = {**{preset.name: preset.holds for preset in PRESETS.values()}, DEMO: DEMO_HOLDS}
    holds["refusal"] = holds["refusal"].removesuffix("; HARC runs only")  # the table says it in its models column
    assert rows == holds
    named = {name: tuple(re.findall(r"`(\w+)`", tasks))
             for name, tasks in re.findall(r"`([\w-]+)` = ((?:`\w+`(?:,\s*)?)+)", text)}
    assert named == {preset.name: preset.tasks for preset in PRESETS.values()
                     if preset.name not in ("refusal", "jailbreak")}  # run by this package, not a library


# Commits of other projects that the docs and the code cite as where a list or a result comes from: first seven
# characters -> the project
UPSTREAM_COMMITS = {"098262e": "llm-attacks/llm-attacks", "a3bb396": "paul-rottger/exaggerated-safety",
                    "8e1604d": "centerforaisafety/HarmBench", "ff6d4d1": "hiyouga/LLaMA-Factory"}
# projects whose issues and pull requests the docs may cite by number, named just before it ("LLaMA-Factory issue
# 10610", "accelerate's issue 12")
UPSTREAM_BEFORE = re.compile(r"(?:LLaMA-Factory|accelerate|transformers|DeepSpeed|PyTorch|torch|peft|trl|bitsandbytes"
                             r"|LLaVA)(?:'s)? $", re.I)
# an issue number: "issue" and a number, "#" and a number, or a bare parenthesised number closing a docstring
OWN_ISSUE = re.compile(r"\b(?:issues?|item \d+ of issue) #?\d+|(?<![\w/.:&-])#\d{1,5}\b(?![0-9a-fA-F])"
                       r'|\(\d{2,3}\)(?=\.?""")', re.I)
# a commit hash: 7 to 40 hex digits, a letter and a digit among them; a string literal holding only one is a value
COMMIT = re.compile(r"(?<![\w#/.-])(?!(?<=\")[0-9a-f]{7,40}\")(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}"
                    r"(?![\w/-])")
PROSE = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg"}  # not data (JSON, CSV), whose hashes are values


def test_the_package_recipes_and_docs_name_no_issue_number_or_commit_of_this_project() -> None:
    """The package, the recipes, the docs, the README, the tests, the test support, the benches, dev.py and CI say what
    is true now, not which issue or commit changed it: none holds an issue number of this project ("issue" or "item N of
    issue" and a number, "#" and a number, a bare parenthesised number closing a docstring) nor a commit hash (7 to 40
    hex digits, a letter and a digit among them, as "since" or "on main at" would name one). Allowed, precisely: another
    project's issue or pull request named with it ("LLaMA-Factory issue 10610", "accelerate PR 4206",
    "haotian-liu/LLaVA#835", links to their trackers) and the commits of other projects the docs cite as sources
    (:data:`UPSTREAM_COMMITS`, each with its project). Data files (JSON, CSV) are not read: a hash there is a value, not
    prose; a colour (``#1f77b4``) is no issue number and, six characters long, no hash; nor is a string literal holding
    only hex digits (a test's fake Hub snapshot). docs/cost.md and CI's script included: nothing is skipped."""
    roots = [REPO / name for name in ("plugin", "patches", "recipes", "docs", "tests", "testing", "bench")]
    paths = [REPO / "README.md", REPO / "dev.py", *sorted((REPO / ".ci").iterdir()),
             *(p for root in roots for p in sorted(root.rglob("*"))
               if p.is_file() and p.suffix in PROSE and "__pycache__" not in p.parts)]
    assert {REPO / "docs" / "cost.md", REPO / ".ci" / "run", REPO / "tests" / "test_docs.py"} <= set(paths)
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            named = [m.group() for m in OWN_ISSUE.finditer(line) if not UPSTREAM_BEFORE.search(line[:m.start()])]
            named += [m.group() for m in COMMIT.finditer(line) if m.group()[:7] not in UPSTREAM_COMMITS]
            found += [f"{path.relative_to(REPO)}:{number}: {what}" for what in named]
    assert found == [], "say what is true now instead:\n" + "\n".join(found)
