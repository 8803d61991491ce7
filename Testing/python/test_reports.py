"""Rule-based report labelling (medalign.data.report_labeller) and ``medalign label-reports``.

Hand-written sentences are our own; the real reports are read from ../shared at run time
(CC BY-NC-SA, never copied into the repository).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from medalign.cli import main as cli_main
from medalign.core.errors import InputError, MedAlignError
from medalign.data.report_labeller import find_mentions, label_report, label_reports_csv, normalise, split_sentences, term_pattern
from medalign.knowledge.findings import CT_RATE_FINDINGS, CT_RATE_LT_FINDINGS

REPO = Path(__file__).resolve().parents[2]
ALL = CT_RATE_FINDINGS + CT_RATE_LT_FINDINGS


def positives(text: str, findings=CT_RATE_FINDINGS, **kw) -> set[str]:
    return {k for k, v in label_report(text, findings, **kw).items() if v}


# ------------------------------------------------------------------ text helpers

def test_sentence_split_keeps_decimals_and_splits_quotes_and_semicolons():
    s = split_sentences(normalise('A 3.5 mm nodule. Pleural effusion; "Impression: atelectasis'))
    assert s == ["a 3.5 mm nodule", "pleural effusion", "impression: atelectasis"]


def test_term_pattern_matches_plural_and_hyphen_forms():
    import re

    assert re.fullmatch(term_pattern("bronchiectasis"), "bronchiectases")
    assert re.fullmatch(term_pattern("opacity"), "opacities")
    assert re.fullmatch(term_pattern("bulla"), "bullae")
    assert re.fullmatch(term_pattern("calcified plaques"), "calcified plaque")
    assert re.fullmatch(term_pattern("ground-glass opacity"), normalise("ground-glass  opacities"))
    assert not re.fullmatch(term_pattern("nodule"), "nodular")


# ------------------------------------------------------------------ synonyms and patterns

@pytest.mark.parametrize(
    "text, expected",
    [
        ("Subsegmental atelectatic changes in the lingula.", {"Atelectasis"}),
        ("Scattered ground-glass opacities in both lower lobes.", {"Lung opacity"}),
        ("Several millimetric pulmonary nodules in the right upper lobe.", {"Lung nodule"}),
        ("Centrilobular emphysematous changes in the upper lobes.", {"Emphysema"}),
        ("A dual-chamber pacemaker with leads in the right heart.", {"Medical material"}),
        ("Calcified atheroma plaques in the aortic arch.", {"Arterial wall calcification"}),
        ("Calcified plaques in the LAD and right coronary artery.", {"Coronary artery wall calcification"}),
        ("Calcific plaques in the thoracic aorta and coronary arteries.",
         {"Arterial wall calcification", "Coronary artery wall calcification"}),
        ("The cardiothoracic ratio is increased.", {"Cardiomegaly"}),
        ("Small sliding type hiatal hernia.", {"Hiatal hernia"}),
        ("A 14 mm subcarinal lymph node enlargement.", {"Lymphadenopathy"}),
        ("Minimal effusion in the pericardial space.", {"Pericardial effusion"}),
        ("A 2 cm effusion in the right hemithorax.", {"Pleural effusion"}),
        ("Fibrotic bands and sequelae changes in the right apex.", {"Pulmonary fibrotic sequela"}),
        ("Mosaic attenuation in both lungs, consistent with air trapping.", {"Mosaic attenuation pattern"}),
        ("Peribronchial wall thickening in the lower lobes.", {"Peribronchial thickening"}),
        ("Patchy airspace consolidation in the left lower lobe.", {"Consolidation"}),
        ("Cylindrical bronchiectasis in the middle lobe.", {"Bronchiectasis"}),
        ("Thickened interlobular septa at both bases.", {"Interlobular septal thickening"}),
    ],
)
def test_synonyms_and_patterns_find_each_ct_rate_finding(text, expected):
    assert positives(text) == expected


def test_longest_match_and_masks():
    assert positives("Subcutaneous emphysema in the left chest wall.") == set()
    assert positives("Mediastinal emphysema around the trachea.", ALL) == {"Pneumomediastinum"}
    assert positives("A 9 mm thyroid nodule in the left lobe.") == set()
    assert positives("Fibro-atelectatic changes in the lingula.") == {"Pulmonary fibrotic sequela"}
    assert positives("Calcification of the aortic valve.") == set()
    assert positives("Simple cyst in the left kidney with perirenal effusion.") == set()


def test_ct_rate_lt_findings_are_labelled_too():
    assert positives("Small left apical pneumothorax.", ALL) == {"Pneumothorax"}
    assert positives("Healed fractures of the right 5th and 6th ribs.", ALL) == {"Rib fracture"}
    assert positives("Honeycombing at both lung bases.", ALL) == {"Pulmonary fibrosis"}
    assert positives("A 5 cm spiculated lung mass in the left upper lobe.", ALL) == {"Lung mass"}


# ------------------------------------------------------------------ negation scope

@pytest.mark.parametrize(
    "text",
    [
        "No pleural effusion.",
        "There is no evidence of pleural effusion.",
        "Pleural effusion was not observed.",
        "Pleural effusion-thickening was not detected in either hemithorax.",
        "The chest is free of pleural effusion.",
        "Pleural effusion has resolved.",
        "Bilateral pleural effusion is ruled out.",
        "Without pleural effusion.",
    ],
)
def test_negations(text):
    assert positives(text) == set()


def test_organ_is_normal_negates_cardiomegaly_but_not_across_a_comma():
    assert positives("Heart size is normal.") == set()
    assert positives("Heart contour and size are normal.") == set()
    assert positives("The heart size is not increased.") == set()
    assert positives("The heart dimensions have increased, its contour is natural.") == {"Cardiomegaly"}
    assert positives("The heart is larger than normal.") == {"Cardiomegaly"}


def test_negation_stops_at_its_clause():
    assert positives("No pleural effusion was seen and atelectasis is present in the left lower lobe.") == {"Atelectasis"}
    assert positives("No lymphadenopathy, but calcified atheroma plaques in the aortic arch.") == {"Arterial wall calcification"}
    assert positives("There is no wall thickening in the esophagus, and there is a small hiatal hernia.") == {"Hiatal hernia"}
    assert positives("No nodular or infiltrative lesion is detected in the lung parenchyma.") == set()
    assert positives("The effusion on the left, which was seen before, was not detected today.") == set()
    assert positives("Pleural effusion, which is new, is seen on the left.") == {"Pleural effusion"}


def test_negation_covers_lists():
    text = "No pleural effusion, pericardial effusion or lymphadenopathy is seen."
    assert positives(text) == set()


# ------------------------------------------------------------------ uncertainty policy

@pytest.mark.parametrize(
    "text",
    [
        "Possible small right pleural effusion.",
        "Findings suspicious for consolidation in the right lower lobe.",
        "Consolidation cannot be excluded in the right lower lobe.",
        "Consolidation in the right lower lobe?",
    ],
)
def test_uncertain_mentions_follow_the_policy(text):
    (mention,) = [m for m in find_mentions(text, CT_RATE_FINDINGS) if m.finding in ("Pleural effusion", "Consolidation")]
    assert mention.uncertain and not mention.negated
    assert positives(text) == {mention.finding}  # default: hedged counts as present
    assert positives(text, uncertain_as=0) == set()


def test_unknown_finding_is_refused():
    with pytest.raises(MedAlignError, match="no finding named"):
        label_report("No effusion.", ["Situs inversus"])


def test_empty_report_is_all_zero():
    assert label_report("") == {f: 0 for f in CT_RATE_FINDINGS}


# ------------------------------------------------------------------ agreement with CT-RATE's manual labels

def _eval_module():
    spec = importlib.util.spec_from_file_location("eval_report_labeler", REPO / "Testing/benchmarks/eval_report_labeler.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ctrate_eval(shared_data):
    path = shared_data / "reports" / "ctrate_labeled_reports_800.csv"
    if not path.is_file():
        pytest.skip(f"needs {path}")
    return _eval_module().evaluate(path)


def test_macro_f1_on_800_real_reports(ctrate_eval):
    table, macro, rows, truth, pred = ctrate_eval
    assert len(rows) == 800
    assert macro >= 0.85, f"macro F1 {macro:.3f}"
    worst = min(table.items(), key=lambda kv: kv[1]["f1"])
    assert worst[1]["f1"] >= 0.80, f"{worst[0]} F1 {worst[1]['f1']:.3f}"
    exact = sum(1 for t, p in zip(truth, pred) if t == p) / len(rows)
    assert exact >= 0.65, f"only {exact:.0%} of reports match all 18 labels"


@pytest.mark.parametrize("accession", ["train_412", "train_304", "train_85", "train_604", "train_431", "train_1", "train_13"])
def test_selected_reports_match_their_manual_labels(ctrate_eval, accession):
    _, _, rows, truth, pred = ctrate_eval
    i = next(i for i, r in enumerate(rows) if r["AccessionNo"] == accession)
    assert pred[i] == truth[i]


# ------------------------------------------------------------------ CSV and CLI

def _write_reports(path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["AccessionNo", "report_text"])
        w.writerow(["A1", "No pleural effusion. Small sliding hiatal hernia."])
        w.writerow(["A2", "Heart size increased. A port catheter ends in the superior vena cava."])
        w.writerow(["A3", ""])
    return path


def test_label_reports_csv_writes_id_and_18_columns(tmp_path):
    src = _write_reports(tmp_path / "reports.csv")
    dst = label_reports_csv(src, tmp_path / "out" / "labels.csv", id_column="AccessionNo")
    with dst.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["AccessionNo", *CT_RATE_FINDINGS]
    assert [r["AccessionNo"] for r in rows] == ["A1", "A2", "A3"]
    assert rows[0]["Hiatal hernia"] == "1" and rows[0]["Pleural effusion"] == "0"
    assert rows[1]["Cardiomegaly"] == "1" and rows[1]["Medical material"] == "1"
    assert all(v == "0" for k, v in rows[2].items() if k != "AccessionNo")
    assert not [p for p in dst.parent.iterdir() if p.name != "labels.csv"], "temporary file left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600


def test_labels_of_a_cohorts_reports_are_read_back_by_the_cohort_loader(tmp_path):
    """`medalign label-reports cohort/reports.csv --out cohort/labels.csv` makes a cohort
    that `medalign eval` and `medalign train` can use: the case id column is kept."""
    from helpers import synthetic_ct

    from medalign.core.volume_io import write_volume
    from medalign.data.cohorts import load_cohort

    root = tmp_path / "cohort"
    (root / "volumes").mkdir(parents=True)
    with (root / "reports.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["VolumeName", "report_text"])
        w.writerow(["case_a.nii.gz", "Heart size increased. No pleural effusion."])
        w.writerow(["case_b.nii.gz", "Bilateral pleural effusion."])
    for name in ("case_a", "case_b"):
        write_volume(synthetic_ct(shape_kji=(8, 16, 16)), root / "volumes" / f"{name}.nii.gz")
    label_reports_csv(root / "reports.csv", root / "labels.csv")
    cases = {c.case_id: c for c in load_cohort(root)}
    assert cases["case_a"].labels["Cardiomegaly"] == 1 and cases["case_a"].labels["Pleural effusion"] == 0
    assert cases["case_b"].labels["Pleural effusion"] == 1


def test_label_reports_csv_bad_inputs(tmp_path):
    src = _write_reports(tmp_path / "reports.csv")
    with pytest.raises(InputError, match="no column 'text'"):
        label_reports_csv(src, tmp_path / "x.csv", text_column="text")
    with pytest.raises(InputError, match="no id column"):
        label_reports_csv(src, tmp_path / "x.csv", id_column="PatientID")
    with pytest.raises(InputError, match="does not exist"):
        label_reports_csv(tmp_path / "missing.csv", tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


def test_cli_end_to_end(tmp_path, capsys):
    src = _write_reports(tmp_path / "reports.csv")
    out = tmp_path / "labels.csv"
    assert cli_main(["label-reports", str(src), "--out", str(out), "--id-column", "AccessionNo"]) == 0
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[1]["Cardiomegaly"] == "1"
    lt = tmp_path / "lt.csv"
    assert cli_main(["label-reports", str(src), "--out", str(lt), "--findings", "ct-rate-lt"]) == 0
    with lt.open(newline="") as fh:
        assert list(csv.DictReader(fh).fieldnames) == ["AccessionNo", *CT_RATE_LT_FINDINGS]  # id kept by default
    assert cli_main(["label-reports", str(src), "--out", str(out), "--text-column", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'nope'" in err[0]
    assert cli_main(["label-reports", str(src), "--out", str(out), "--findings", "situs inversus"]) == 2


def test_console_script_runs(tmp_path):
    src = _write_reports(tmp_path / "reports.csv")
    out = tmp_path / "labels.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "medalign.cli", "label-reports", str(src), "--out", str(out), "--findings", "GGO,pacemaker"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["AccessionNo", "Lung opacity", "Medical material"]
    assert [r["Medical material"] for r in rows] == ["0", "1", "0"]
