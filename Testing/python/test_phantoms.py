"""Synthetic chest-CT phantoms: determinism, ground truth consistency, plausibility, dataset I/O."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from medalign.core.errors import InputError
from medalign.knowledge.findings import CT_RATE_FINDINGS
from medalign.synth.anatomy import sample_geometry
from medalign.synth.phantoms import BIT, PHANTOM_FINDINGS, case_seed, make_phantom, write_dataset

COARSE = (2.5, 2.5, 5.0)  # fast grid for tests that do not depend on the scan geometry
ALL = {name: 1 for name in CT_RATE_FINDINGS}
NONE = {name: 0 for name in CT_RATE_FINDINGS}


@pytest.fixture(scope="module")
def full_phantoms():
    """Every finding inserted, on two seeds (different sizes, sides, devices)."""
    return [make_phantom(seed, labels=ALL, spacing=COARSE) for seed in (11, 12)]


@pytest.fixture(scope="module")
def normal_phantom():
    return make_phantom(5, labels=NONE)


def test_finding_list_covers_ct_rate():
    assert len(PHANTOM_FINDINGS) >= 12
    assert set(PHANTOM_FINDINGS) <= set(CT_RATE_FINDINGS)
    assert list(BIT) == CT_RATE_FINDINGS


def test_deterministic_per_seed():
    a = make_phantom(42)
    b = make_phantom(42)
    assert np.array_equal(a.volume.array, b.volume.array)
    assert np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.volume.ijk_to_ras, b.volume.ijk_to_ras)
    assert a.report == b.report and a.labels == b.labels and a.meta == b.meta
    c = make_phantom(43)
    assert a.volume.array.shape != c.volume.array.shape or not np.array_equal(a.volume.array, c.volume.array)
    assert a.report != c.report


def test_case_seed_is_stable_and_distinct():
    seeds = [case_seed(7, i) for i in range(50)]
    assert len(set(seeds)) == 50
    assert seeds == [case_seed(7, i) for i in range(50)]
    assert case_seed(8, 0) != case_seed(7, 0)


def test_masks_match_labels_exactly(full_phantoms, normal_phantom):
    for ph in full_phantoms + [normal_phantom]:
        assert ph.mask.dtype == np.int32 and ph.mask.shape == ph.volume.array.shape
        assert set(ph.labels) == set(CT_RATE_FINDINGS)
        for name in CT_RATE_FINDINGS:
            present = bool(np.any(ph.mask & BIT[name]))
            assert present == bool(ph.labels[name]), name
    assert not normal_phantom.mask.any()


def test_forced_labels_and_prevalence():
    ph = make_phantom(3, labels={"Lung nodule": 1}, spacing=COARSE, prevalence=0.0)
    assert [k for k, v in ph.labels.items() if v] == ["Lung nodule"]
    ph1 = make_phantom(3, spacing=COARSE, prevalence=1.0)
    assert all(ph1.labels.values())
    with pytest.raises(InputError):
        make_phantom(1, labels={"Not a finding": 1})
    with pytest.raises(InputError):
        make_phantom(1, prevalence=1.5)
    with pytest.raises(InputError):
        make_phantom(1, spacing=(0.0, 1.0, 1.0))


def test_counterfactual_twins_differ_only_in_the_toggled_lesion():
    """Counterfactual twins (Testing/benchmarks/counterfactual_twins.py): the same seed with
    one finding on and off keeps every other lesion, the devices and the noise."""
    from scipy import ndimage

    others = {name: int(i % 3 == 0) for i, name in enumerate(CT_RATE_FINDINGS)}  # six other findings on
    for finding in ("Lung nodule", "Arterial wall calcification"):
        others[finding] = 0
        on = make_phantom(21, labels=others | {finding: 1}, spacing=COARSE)
        off = make_phantom(21, labels=others | {finding: 0}, spacing=COARSE)
        lesion = (on.mask & BIT[finding]) > 0
        assert lesion.any() and not (off.mask & BIT[finding]).any()
        assert np.array_equal(on.mask & ~BIT[finding], off.mask)  # the other lesions, voxel for voxel
        # outside the lesion (and the blur's one-voxel reach) only rounding differs
        near = ndimage.binary_dilation(lesion, iterations=2)
        diff = np.abs(on.volume.array.astype(np.int32) - off.volume.array.astype(np.int32))
        assert diff[~near].max() <= 1
        assert diff[lesion].mean() > 50  # and the lesion itself is there


def _region(ph, name):
    return ph.volume.array[(ph.mask & BIT[name]) > 0].astype(np.float32)


def test_findings_have_ct_like_densities(full_phantoms):
    for ph in full_phantoms:
        assert np.median(_region(ph, "Emphysema")) < -880
        assert -80 < np.median(_region(ph, "Pleural effusion")) < 60
        assert -60 < np.median(_region(ph, "Pericardial effusion")) < 70
        assert np.median(_region(ph, "Consolidation")) > -350
        assert -750 < np.median(_region(ph, "Lung opacity")) < -150
        solid = any(n["solid"] for n in ph.meta["findings"]["Lung nodule"]["nodules"])
        assert _region(ph, "Lung nodule").max() > (-200 if solid else -650)  # ground-glass nodules exist
        assert _region(ph, "Arterial wall calcification").max() > 200
        assert _region(ph, "Coronary artery wall calcification").max() > 150
        assert _region(ph, "Medical material").max() > 150
        assert 0 < np.median(_region(ph, "Lymphadenopathy")) < 80
        assert np.median(_region(ph, "Cardiomegaly")) > 0


def test_emphysema_meets_the_quantitative_definition(full_phantoms):
    """Low-attenuation areas cover at least 5% of the lung (LAA-950, COPDGene's threshold),
    so the finding is there to see, not a handful of holes lost in the noise."""
    for ph in full_phantoms:
        facts = ph.meta["findings"]["Emphysema"]
        assert 0.05 <= facts["lung_fraction"] <= 0.25
        region = _region(ph, "Emphysema")
        assert np.median(region) < -930  # partial volume with the walls between areas at 5 mm slices


def test_tissue_densities_are_plausible(normal_phantom):
    a = normal_phantom.volume.array
    assert a.dtype == np.int16
    assert a.min() >= -1024 and a.max() <= 3071
    lung = a[(a > -960) & (a < -600)]
    assert lung.size > 0.05 * a.size  # lungs are a large part of a chest CT
    assert -900 < float(np.median(lung)) < -800
    frac = lambda lo, hi: float(((a >= lo) & (a <= hi)).mean())  # noqa: E731
    assert frac(-150, -60) > 0.01  # subcutaneous and mediastinal fat
    assert frac(10, 90) > 0.05  # muscle, heart, liver
    assert frac(250, 3071) > 0.002  # ribs, spine, sternum
    assert frac(-1024, -990) > 0.05  # air around the patient
    # noise: air outside the body is flat apart from quantum noise
    corner = a[:, :4, :4].astype(np.float32)
    assert 2.0 < float(corner.std()) < 40.0


def test_normal_anatomy_is_as_dense_as_real_scans():
    """Real chest CTs hold bone, undiluted contrast and ECG snaps above 1000 HU with no
    device in them; phantoms must too, or the model reads every dense voxel as medical
    material (version 3 of the demo model did, on every shared real CT)."""
    for seed in (0, 1, 13):  # seed 13 (on this grid, no findings) has contrast inflow and ECG leads
        ph = make_phantom(seed, labels=NONE, spacing=COARSE)
        a = ph.volume.array
        assert not np.any(ph.mask & BIT["Medical material"])
        assert np.percentile(a, 99.9) > 700  # cortical bone
        assert a.max() > 1000
    assert ph.meta["contrast"] and ph.meta["contrast_inflow"] and ph.meta["ecg_electrodes"] > 0


def test_enlarged_nodes_lie_in_mediastinal_fat():
    """A node painted over lung looks like an unlabelled lung nodule and one painted over
    blood is invisible (generator 1.1: 40% and 26% of node voxels); nodes displace fat."""
    for seed in (3, 5):
        with_nodes = make_phantom(seed, labels=NONE | {"Lymphadenopathy": 1}, spacing=COARSE)
        anatomy = make_phantom(seed, labels=NONE, spacing=COARSE).volume.array.astype(np.float32)
        nodes = (with_nodes.mask & BIT["Lymphadenopathy"]) > 0
        assert nodes.sum() > 20
        under = anatomy[nodes]
        assert np.mean(under < -500) < 0.01  # never on lung
        assert np.median(under) < -50  # on fat
        assert np.median(with_nodes.volume.array[nodes]) - np.median(under) > 80  # so they show


def test_ecg_leads_lie_outside_the_body():
    """Electrodes sit on the skin and their wires in the air in front: the lung and
    mediastinum are untouched, so a phantom's findings do not depend on them."""
    from medalign.synth.anatomy import build_anatomy
    from medalign.synth.painting import PaintContext
    from medalign.synth.scanner import ecg_leads

    rng = np.random.default_rng(0)
    anat = build_anatomy(rng, sample_geometry(rng, COARSE))
    before = anat.hu.copy()
    n = ecg_leads(PaintContext(anat, np.random.default_rng(1)))
    changed = anat.hu != before
    assert 2 <= n <= 5 and changed.any()
    assert not np.any(changed & (anat.lung > 0))
    assert before[changed].mean() < -300  # mostly air (wires) and skin (pads)
    assert anat.hu[changed].max() > 800  # metal snaps and wires


def test_each_registered_painter_marks_its_own_finding():
    """The registry pairs every CT-RATE finding with its painter: run alone on a normal
    anatomy, each painter sets its own mask bit and no other, and returns report facts."""
    import dataclasses

    from medalign.synth.anatomy import build_anatomy
    from medalign.synth.findings import ANATOMICAL, PAINT_ORDER, REGISTRY
    from medalign.synth.painting import PaintContext

    assert list(REGISTRY) == [*PAINT_ORDER, *ANATOMICAL] and set(REGISTRY) == set(CT_RATE_FINDINGS)
    rng = np.random.default_rng(3)
    anat = build_anatomy(rng, sample_geometry(rng, COARSE))
    anat.p["z_table"] = 0.0
    for name in PAINT_ORDER:
        ctx = PaintContext(dataclasses.replace(anat, hu=anat.hu.copy()), np.random.default_rng(4))
        facts = REGISTRY[name].paint(ctx)
        assert int(np.bitwise_or.reduce(ctx.mask, axis=None)) == BIT[name], name
        assert isinstance(facts, dict) and facts, name


def test_each_registered_report_words_its_findings_facts(full_phantoms):
    """Beside each painter, its report sentence turns that finding's facts into text."""
    from medalign.synth.findings import REGISTRY

    facts = full_phantoms[0].meta["findings"]
    for name, spec in REGISTRY.items():
        sentence = spec.report(np.random.default_rng(0), facts[name], lambda k=2, name=name: name.lower())
        assert sentence.endswith(".") and len(sentence) > 20, name
    lobe = facts["Consolidation"]["lobe"]
    assert lobe in REGISTRY["Consolidation"].report(np.random.default_rng(0), facts["Consolidation"], str)


def test_bronchi_along_follow_their_arteries():
    from medalign.synth.vessel_trees import Branch, bronchi_along

    art = [Branch(np.zeros(3), np.array([0.0, 30.0, -10.0]), 5.0, 4.0, 0, 0),
           Branch(np.array([0.0, 30.0, -10.0]), np.array([0.0, 50.0, -30.0]), 2.0, 1.0, 3, 1)]
    normal = bronchi_along(art, max_gen=4)
    wide = bronchi_along(art, max_gen=4, lumen_factor=2.0, start=np.array([1.0, 2.0, 3.0]))
    assert len(bronchi_along(art, max_gen=2)) == 1  # generations past max_gen are left out
    assert normal[0].r0 == pytest.approx(4.25) and wide[0].r0 == pytest.approx(10.0)
    assert normal[1].r1 == pytest.approx(0.85) and wide[1].r1 == pytest.approx(2.0)
    assert np.allclose(wide[0].p0, [1.0, 2.0, 3.0])  # joined to the main bronchus
    gap = np.linalg.norm(normal[0].p1 - art[0].p1)
    assert gap == pytest.approx(art[0].r1 + normal[0].r1 + 1.0)  # beside the artery, not in it


def test_geometry_and_affine():
    for seed in range(30):
        g = sample_geometry(np.random.default_rng(seed), None)
        sx, sy, sz = g["spacing"]
        assert 1.2 <= sx <= 2.5 and sx == sy and 1.5 <= sz <= 5.0
    ph = make_phantom(9)
    sx, sy, sz = ph.volume.spacing
    m = ph.volume.ijk_to_ras
    assert np.allclose(m[:3, :3], np.diag([-sx, -sy, sz]))  # LPS voxel axes, RAS world
    nz, ny, nx = ph.volume.array.shape
    assert 250 <= nz * sz <= 380  # lung apex to upper abdomen
    assert 280 <= nx * sx <= 460 and 200 <= ny * sy <= 360
    # finding centres recorded in RAS land inside the volume near a masked voxel
    ph = make_phantom(21, labels={"Lung nodule": 1}, spacing=COARSE, prevalence=0.0)
    nod = ph.meta["findings"]["Lung nodule"]["nodules"][0]
    ijk = np.rint(ph.volume.ras_to_ijk_points(np.array(nod["center_ras"]))[0]).astype(int)
    i, j, k = ijk
    assert ph.mask[k, j, i] & BIT["Lung nodule"]


def test_report_mentions_findings_with_actual_sizes(full_phantoms, normal_phantom):
    ph = full_phantoms[0]
    assert ph.report.startswith("FINDINGS:") and "IMPRESSION:" in ph.report
    low = ph.report.lower()
    nod = ph.meta["findings"]["Lung nodule"]["nodules"][0]
    assert f"{nod['diameter_mm']:.0f} mm" in ph.report
    assert nod["lobe"] in low
    for word in ("nodul", "pleural", "pericardial", "emphysem", "consolidation", "bronchiectasis", "hernia", "lymph node"):
        assert word in low, word
    normal = normal_phantom.report
    assert "IMPRESSION:" in normal
    assert not re.search(r"\d+ mm (solid )?nodule", normal)


def test_reports_vary_in_wording():
    reports = {make_phantom(s, labels={"Pleural effusion": 1}, spacing=COARSE, prevalence=0.0).report for s in range(6)}
    assert len(reports) == 6
    firsts = {r.split("IMPRESSION:")[0] for r in reports}
    assert len(firsts) >= 4


def test_write_dataset_layout_and_round_trip(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    out = write_dataset(tmp_path / "ds", n=2, seed=5, prevalence=0.5, progress=False)
    ids = [f"phantom_5_{i:05d}" for i in range(2)]
    for cid in ids:
        assert (out / "volumes" / f"{cid}.nii.gz").is_file()
        assert (out / "masks" / f"{cid}.nii.gz").is_file()
    assert not list(out.rglob(".tmp_*"))
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["VolumeName", *CT_RATE_FINDINGS]
    assert [r[0] for r in rows[1:]] == [f"{cid}.nii.gz" for cid in ids]
    with open(out / "reports.csv", newline="") as fh:
        reps = list(csv.DictReader(fh))
    assert list(reps[0]) == ["VolumeName", "report_text"] and len(reps) == 2
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["seed"] == 5 and manifest["n"] == 2 and manifest["phantom_findings"] == PHANTOM_FINDINGS
    assert manifest["prevalence"] == 0.5 and manifest["generator_version"]

    # each case regenerates alone and matches what was written, geometry included
    ph = make_phantom(case_seed(5, 1), prevalence=0.5)
    img = sitk.ReadImage(str(out / "volumes" / f"{ids[1]}.nii.gz"))
    msk = sitk.ReadImage(str(out / "masks" / f"{ids[1]}.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(img), ph.volume.array)
    assert sitk.GetArrayFromImage(msk).dtype == np.int32
    assert np.array_equal(sitk.GetArrayFromImage(msk), ph.mask)
    assert [int(v) for v in rows[2][1:]] == [ph.labels[k] for k in CT_RATE_FINDINGS]
    assert reps[1]["report_text"] == ph.report
    d = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())[None, :]
    ras = np.diag([-1.0, -1.0, 1.0]) @ d
    assert np.allclose(ras, ph.volume.ijk_to_ras[:3, :3], atol=1e-4)
    assert np.allclose(np.diag([-1.0, -1.0, 1.0]) @ np.array(img.GetOrigin()), ph.volume.ijk_to_ras[:3, 3], atol=1e-3)
    assert np.array_equal(img.GetSize(), msk.GetSize()) and np.allclose(img.GetOrigin(), msk.GetOrigin())


def test_write_dataset_restricts_findings(tmp_path):
    out = write_dataset(tmp_path / "ds", n=2, seed=1, prevalence=1.0, progress=False, findings=["Cardiomegaly"])
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        assert row["Cardiomegaly"] == "1"
        assert all(row[k] == "0" for k in CT_RATE_FINDINGS if k != "Cardiomegaly")
    with pytest.raises(InputError):
        write_dataset(tmp_path / "bad", n=0, seed=1, progress=False)


def test_cli_phantoms(tmp_path, capsys):
    from medalign.cli import main

    rc = main(["phantoms", "--out", str(tmp_path / "cli"), "--n", "2", "--seed", "4", "--findings", "Lung nodule;effusion",
               "--prevalence", "1", "--progress-lines"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "MEDALIGN-PROGRESS 1.0000" in out
    with open(tmp_path / "cli" / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert all(r["Lung nodule"] == "1" and r["Pleural effusion"] == "1" and r["Cardiomegaly"] == "0" for r in rows)
    assert main(["phantoms", "--out", str(tmp_path / "x"), "--n", "1", "--findings", "Broken leg"]) == 2
    assert "not one of the 18" in capsys.readouterr().err
