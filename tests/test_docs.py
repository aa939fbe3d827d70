"""Every node the pack defines has a help page (web/docs/<id>.md) and a README entry, and the
node ids named in the issues exist (workflows and outside checks depend on them)."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED_IDS = {
    "EmbroideryStyleBlocksLoader", "EmbroiderySaveStyleLoRA", "EmbroideryLoRABlockInspector",
    "EmbroideryAnalogyPair", "EmbroideryFindStyleBlocks", "EmbroideryTrainStage1", "EmbroideryTrainStage2",
    "EmbroideryColourFix", "EmbroideryStyleGuidance", "EmbroideryMaskedStyle", "EmbroideryBLoRAMix",
}


def node_ids():
    ids = set()
    for path in glob.glob(os.path.join(ROOT, "nodes", "*.py")):
        with open(path) as f:
            ids |= set(re.findall(r'node_id="([A-Za-z0-9_]+)"', f.read()))
    return ids


def test_fixed_node_ids_exist():
    assert FIXED_IDS <= node_ids()


def test_every_node_has_a_help_page_and_a_readme_entry():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for node_id in node_ids():
        page = os.path.join(ROOT, "web", "docs", f"{node_id}.md")
        assert os.path.isfile(page), f"missing help page {page}"
        with open(page) as f:
            assert f.read().startswith("# "), page
        assert f"`{node_id}`" in readme, f"README does not mention {node_id}"


def test_readme_node_table_has_a_row_per_node():
    """One unbroken markdown table under "## Nodes": a blank line inside it would end the
    table, and GitHub shows the rows after it as plain text."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("\n## Nodes\n", 1)[1].split("\n## ", 1)[0]
    lines = section.strip("\n").splitlines()
    table = []
    for line in lines:
        if not line.startswith("|"):
            break
        table.append(line)
    assert table[1].replace(" ", "").startswith("|---|"), table[:2]
    rows = {line.split("|")[1].strip().strip("`") for line in table[2:]}
    assert rows == node_ids()


def test_readme_pictures_exist_for_every_template():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    for picture in pictures:
        assert os.path.isfile(os.path.join(ROOT, picture)), picture
    templates = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "workflows", "*.json"))}
    assert templates == {os.path.basename(p)[:-4] for p in pictures if p.startswith("docs/workflows/")}
