"""Knowledge base files and prompt building (medalign.knowledge.findings)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from medalign.core.errors import MedAlignError
from medalign.knowledge.findings import (
    ABDOMINAL_FINDINGS,
    CT_RATE_FINDINGS,
    CT_RATE_LT_FINDINGS,
    SYMPTOM_KEYS,
    FindingKnowledge,
    PromptSet,
    build_prompts,
    find,
    knowledge_dir,
    load_knowledge,
    slugify,
)

CTCLIP = {"positive": ["{finding} is present."], "negative": ["{finding} is not present."]}
BRGSA = {"positive": ["There is {finding}"], "negative": ["There is no {finding}"]}


def test_finding_lists_are_the_published_ones():
    assert len(CT_RATE_FINDINGS) == 18 and len(set(CT_RATE_FINDINGS)) == 18
    assert len(CT_RATE_LT_FINDINGS) == 15 and len(set(CT_RATE_LT_FINDINGS)) == 15
    assert not set(CT_RATE_FINDINGS) & set(CT_RATE_LT_FINDINGS)
    # column order of the CT-RATE label files
    assert CT_RATE_FINDINGS[0] == "Medical material" and CT_RATE_FINDINGS[-1] == "Interlobular septal thickening"
    assert CT_RATE_FINDINGS.index("Atelectasis") == 8


def test_abdominal_set_is_its_own_group_and_merlins_default():
    from medalign.knowledge.findings import FINDING_GROUPS, parse_findings
    from medalign.models.base import ScreeningModel
    from medalign.models.merlin import MerlinModel

    assert len(ABDOMINAL_FINDINGS) == len(set(ABDOMINAL_FINDINGS)) == 20
    assert not set(ABDOMINAL_FINDINGS) & (set(CT_RATE_FINDINGS) | set(CT_RATE_LT_FINDINGS))
    assert parse_findings("abdominal") == ABDOMINAL_FINDINGS
    assert parse_findings("Ascites;ABDOMINAL;renal stone") == ABDOMINAL_FINDINGS  # de-duplicated, case-blind
    assert FINDING_GROUPS[MerlinModel.default_findings] is ABDOMINAL_FINDINGS
    assert FINDING_GROUPS[ScreeningModel.default_findings] is CT_RATE_FINDINGS  # every other family
    kb = load_knowledge()
    assert all(kb[name].group == "abdominal" for name in ABDOMINAL_FINDINGS)
    assert find("nephrolithiasis").name == "Renal stone" and find("fatty liver").name == "Hepatic steatosis"
    assert find("free intraperitoneal air").name == "Pneumoperitoneum" and find("AAA").name == "Abdominal aortic aneurysm"


def test_every_packaged_yaml_loads_with_all_fields():
    files = sorted(knowledge_dir().glob("*.yaml"))
    assert len(files) == 53
    kb = load_knowledge()
    assert set(kb) == set(CT_RATE_FINDINGS) | set(CT_RATE_LT_FINDINGS) | set(ABDOMINAL_FINDINGS)
    for name, item in kb.items():
        assert isinstance(item, FindingKnowledge)
        assert (knowledge_dir() / f"{item.slug}.yaml").is_file()
        assert item.group == (
            "ct-rate" if name in CT_RATE_FINDINGS else "abdominal" if name in ABDOMINAL_FINDINGS else "ct-rate-lt")
        assert item.synonyms and item.anatomy and item.negations
        assert len(item.definition.split()) >= 8, f"{name}: definition too thin"
        for key in SYMPTOM_KEYS:
            assert item.symptoms[key].strip(), f"{name}: symptoms.{key} empty"
        assert any("{finding}" in n for n in item.negations)
        # negation templates must read as negations once filled
        for n in item.negations:
            low = n.lower()
            assert any(w in low for w in ("no ", "not ", "normal", "without")), f"{name}: {n!r} is not a negation"
        raw = yaml.safe_load((knowledge_dir() / f"{item.slug}.yaml").read_text(encoding="utf-8"))
        assert raw["name"] == name


def test_names_and_synonyms_are_unique_across_the_kb():
    kb = load_knowledge()
    seen: dict[str, str] = {}
    for item in kb.values():
        for term in (item.name, *item.synonyms):
            key = " ".join(term.lower().split())
            assert seen.setdefault(key, item.name) == item.name, f"{term!r} in {item.name} and {seen[key]}"


def test_report_spellings_are_synonyms():
    # spellings real reports use must find their finding
    cases = {
        "atelectatic changes": "Atelectasis",
        "subsegmental atelectasis": "Atelectasis",
        "ground glass": "Lung opacity",
        "GGO": "Lung opacity",
        "nodular opacity": "Lung nodule",
        "calcified atheroma plaques": "Arterial wall calcification",
        "lymph node enlargement": "Lymphadenopathy",
        "pacemaker": "Medical material",
        "port catheter": "Medical material",
        "sternotomy wires": "Medical material",
        "fibrotic changes": "Pulmonary fibrotic sequela",
        "sequelae": "Pulmonary fibrotic sequela",
        "mediastinal emphysema": "Pneumomediastinum",
        "TB": "Tuberculosis",
    }
    kb = load_knowledge()
    for term, name in cases.items():
        item = find(term, kb)
        assert item is not None and item.name == name, term


def test_find_is_case_insensitive_and_accepts_slugs():
    assert find("lung NODULE").name == "Lung nodule"
    assert find("  Lung   nodule ").name == "Lung nodule"
    assert find("coronary_artery_wall_calcification").name == "Coronary artery wall calcification"
    assert find("Pulmonary nodule").name == "Lung nodule"
    assert find("situs inversus") is None  # (splenomegaly, the old example, is known since the abdominal set)
    assert find("SPLENOMEGALY").name == "Splenomegaly"
    assert find("") is None


def test_slugify():
    assert slugify("Lung nodule") == "lung_nodule"
    assert slugify(" Coronary artery wall calcification ") == "coronary_artery_wall_calcification"
    assert slugify("COVID-19 pneumonia") == "covid_19_pneumonia"
    assert load_knowledge()["Mosaic attenuation pattern"].slug == "mosaic_attenuation_pattern"


def test_load_knowledge_is_cached_but_returns_a_copy():
    a = load_knowledge()
    a.pop("Cardiomegaly")
    b = load_knowledge()
    assert "Cardiomegaly" in b


def _copy_one(tmp_path: Path, slug: str) -> tuple[Path, dict]:
    folder = tmp_path / "kb"
    folder.mkdir()
    shutil.copy(knowledge_dir() / f"{slug}.yaml", folder / f"{slug}.yaml")
    return folder, yaml.safe_load((folder / f"{slug}.yaml").read_text(encoding="utf-8"))


def test_missing_field_names_file_and_field(tmp_path):
    folder, data = _copy_one(tmp_path, "emphysema")
    del data["definition"]
    (folder / "emphysema.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(MedAlignError, match=r"emphysema\.yaml.*'definition'"):
        load_knowledge(folder)


def test_missing_symptom_key_and_bad_group_are_reported(tmp_path):
    folder, data = _copy_one(tmp_path, "emphysema")
    del data["symptoms"]["shape"]
    (folder / "emphysema.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(MedAlignError, match=r"symptoms\.shape"):
        load_knowledge(folder)
    (tmp_path / "b").mkdir()
    folder2, data = _copy_one(tmp_path / "b", "emphysema")
    data["group"] = "other"
    (folder2 / "emphysema.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(MedAlignError, match="group"):
        load_knowledge(folder2)


def test_file_name_must_match_finding_and_yaml_must_parse(tmp_path):
    folder, data = _copy_one(tmp_path, "emphysema")
    (folder / "emphysema.yaml").rename(folder / "lung_holes.yaml")
    with pytest.raises(MedAlignError, match="emphysema.yaml"):
        load_knowledge(folder)
    (folder / "lung_holes.yaml").write_text("name: [unclosed")
    with pytest.raises(MedAlignError, match="cannot be read as YAML"):
        load_knowledge(folder)


def test_ambiguous_synonym_is_refused(tmp_path):
    folder, data = _copy_one(tmp_path, "emphysema")
    shutil.copy(knowledge_dir() / "atelectasis.yaml", folder / "atelectasis.yaml")
    data["synonyms"].append("Subsegmental atelectasis")
    (folder / "emphysema.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(MedAlignError, match="already used"):
        load_knowledge(folder)


def test_custom_folder_extends_the_vocabulary(tmp_path):
    folder, data = _copy_one(tmp_path, "emphysema")
    data.update(name="Splenomegaly", synonyms=["enlarged spleen"], group="ct-rate-lt")
    (folder / "splenomegaly.yaml").write_text(yaml.safe_dump(data))
    kb = load_knowledge(folder)
    assert set(kb) == {"Emphysema", "Splenomegaly"}
    assert find("enlarged spleen", kb).name == "Splenomegaly"


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(MedAlignError, match="does not exist"):
        load_knowledge(tmp_path / "nope")
    with pytest.raises(MedAlignError, match="no \\*\\.yaml"):
        load_knowledge(tmp_path)


# ------------------------------------------------------------------ prompts

def test_index_zero_is_the_family_wording_exactly():
    for name in CT_RATE_FINDINGS:
        ps = build_prompts(name, CTCLIP)
        assert isinstance(ps, PromptSet)
        assert ps.positive[0] == f"{name} is present."
        assert ps.negative[0] == f"{name} is not present."
    ps = build_prompts("Lung nodule", BRGSA)
    assert ps.positive[0] == "There is Lung nodule" and ps.negative[0] == "There is no Lung nodule"


def test_knowledge_adds_synonyms_and_negations_in_a_fixed_order():
    kb = load_knowledge()
    item = kb["Atelectasis"]
    ps = build_prompts("Atelectasis", CTCLIP, max_per_side=20)
    # synonyms follow the name on both sides, mirrored index by index
    assert ps.positive[1] == f"{item.synonyms[0][0].upper()}{item.synonyms[0][1:]} is present."
    n_pos = len(ps.positive)
    assert [p.replace(" is present.", "") for p in ps.positive] == [n.replace(" is not present.", "") for n in ps.negative[:n_pos]]
    # the knowledge's own negations come last on the negative side, filled mid-sentence in lower case
    assert "No atelectasis." in ps.negative[n_pos:]
    assert "Atelectasis was not observed." in ps.negative[n_pos:]
    assert build_prompts("Atelectasis", CTCLIP, max_per_side=20) == ps  # deterministic


def test_prompts_are_deduplicated_and_capped():
    templates = {
        "positive": ["{finding} is present.", "{finding} is present.", "There is {finding}."],
        "negative": ["{finding} is not present.", "There is no {finding}."],
    }
    ps = build_prompts("Cardiomegaly", templates, max_per_side=50)
    assert len(ps.positive) == len({p.lower() for p in ps.positive})
    assert len(ps.negative) == len({p.lower() for p in ps.negative})
    # "There is no {finding}." + KB "There is no {finding}." collapse into one
    assert ps.negative.count("There is no cardiomegaly.") + ps.negative.count("There is no Cardiomegaly.") == 1
    short = build_prompts("Cardiomegaly", templates, max_per_side=3)
    assert len(short.positive) == 3 and len(short.negative) == 3
    assert short.positive == ps.positive[:3] and short.negative == ps.negative[:3]


def test_grammar_keeps_acronyms_and_capitalises_sentence_starts():
    ps = build_prompts("Lung opacity", BRGSA, max_per_side=20)
    assert "There is ground glass opacity" in ps.positive
    ps2 = build_prompts("Lung opacity", CTCLIP, max_per_side=30)
    assert all(p[0].isupper() for p in ps2.positive)


def test_free_text_finding_uses_templates_alone():
    ps = build_prompts("situs inversus", CTCLIP)
    assert ps.positive == ["situs inversus is present."]
    assert ps.negative == ["situs inversus is not present."]
    plain = build_prompts("Emphysema", CTCLIP, use_knowledge=False)
    assert plain.positive == ["Emphysema is present."] and plain.negative == ["Emphysema is not present."]


def test_synonym_input_uses_that_findings_knowledge():
    ps = build_prompts("GGO", CTCLIP, max_per_side=20)
    assert ps.positive[0] == "GGO is present."
    assert "Lung opacity is present." in ps.positive
    assert "No lung opacity." in ps.negative


def test_bad_templates_are_refused():
    with pytest.raises(MedAlignError):
        build_prompts("Emphysema", {"positive": ["present"], "negative": ["{finding} absent"]})
    with pytest.raises(MedAlignError):
        build_prompts("Emphysema", {"positive": ["{finding}"]})
    with pytest.raises(MedAlignError):
        build_prompts("   ", CTCLIP)
    with pytest.raises(MedAlignError):
        build_prompts("Emphysema", CTCLIP, max_per_side=0)
