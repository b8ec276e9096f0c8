"""The bench's unseen group: pairs built from a CT no training used, storage variants with the same physical
content, and the group's pass criteria."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LungUDRNetBench import data, tables, unseen
from LungUDRNetBench.tables import group_of, markdown, summarise
from LungUDRNetLib.io import write_displacement_field

from test_trainer_supervision import constant_field


@pytest.fixture(scope="module")
def unseen_folders(tmp_path_factory, lung2_breathing_pair):  # the fixture skips without the sample CTs
    plan = [data.UnseenPair("unseen_test_setup", seed=21, amplitude_mm=12.0, angles_deg=(5.0, 0.0, -5.0),
                            shift_mm=(10.0, -10.0, 20.0), thickness_mm=5.0),
            data.UnseenPair("unseen_test_setup_flipped", storage_of="unseen_test_setup", order=(1, 0, 2),
                            flips=(True, False, True))]
    monkey = pytest.MonkeyPatch()
    monkey.setattr(data, "UNSEEN_PLAN", plan)
    folders = data.unseen_pairs(tmp_path_factory.mktemp("unseen"), tmp_path_factory.mktemp("no_elastix"))
    yield [data.read_pair(folder) for folder in folders]
    monkey.undo()


def test_unseen_pairs_have_thick_slices_no_masks_and_a_stored_otherwise_twin(unseen_folders):
    base, twin = unseen_folders
    assert (base.name, twin.name) == ("unseen_test_setup", "unseen_test_setup_flipped")
    assert base.fixed.GetSpacing()[2] == pytest.approx(5.0) and base.moving.GetSpacing()[2] == pytest.approx(5.0)
    assert base.fixed_mask is None and base.moving_mask is None
    assert base.fixed.GetPixelID() == base.moving.GetPixelID() == sitk.sitkInt16  # stored as scanners store CT
    moved = np.linalg.norm(base.moving_points - base.fixed_points, axis=1)
    assert moved.mean() > 10.0  # breathing plus a 24 mm set-up shift
    np.testing.assert_array_equal(twin.fixed_points, base.fixed_points)
    assert twin.fixed.GetDirection() != base.fixed.GetDirection()
    for image_base, image_twin in ((base.fixed, twin.fixed), (base.moving, twin.moving)):
        resampled = sitk.Resample(image_twin, image_base, sitk.Transform(), sitk.sitkNearestNeighbor)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(image_base))
    assert {group_of(p.name) for p in unseen_folders} == {"unseen"} and group_of("lung1_s0_a8") == "standard"


def test_criteria_count_halved_and_worse_pairs_and_measure_the_storage_gap(unseen_folders, tmp_path):
    base, twin = unseen_folders
    runs = tmp_path / "runs"
    for name, vector in ((base.name, (0.0, 0.0, 0.0)), (twin.name, (0.0, 0.3, 0.4))):
        (runs / "m" / name).mkdir(parents=True)
        write_displacement_field(constant_field(base.fixed, vector), runs / "m" / name / "field.mha")
    rows = [{"group": "unseen", "method": "m", "pair": base.name, "tre_before_mm": 10.0, "tre_mean_mm": 4.0,
             "folding_percent": 0.0, "error": None},
            {"group": "unseen", "method": "m", "pair": twin.name, "tre_before_mm": 10.0, "tre_mean_mm": 11.0,
             "folding_percent": 0.02, "error": None}]
    lines = unseen.criteria(rows, {p.name: p for p in unseen_folders}, {twin.name: base.name}, runs)
    assert len(lines) == 1
    assert "at most half of before on 1 of 2 pairs" in lines[0]
    assert f"worse than no registration on 1 ({twin.name})" in lines[0]
    assert "largest folding 0.020 %" in lines[0] and "at most 0.500 mm apart" in lines[0]


def test_groups_are_summarised_apart():
    rows = [{"group": g, "method": "m", "pair": p, "tre_before_mm": 9.0, "tre_mean_mm": t, "tre_std_mm": 1.0,
             "tre_p90_mm": 1.0, "dice_percent": None, "one_minus_mse_percent": 99.0, "ncc_percent": 90.0,
             "sdlogj": 0.1, "folding_percent": 0.0, "process_s": 3.0, "median_s": 1.0, "timed_runs": 1,
             "method_median_s": 0.5, "peak_rss_mb": 100.0, "error": None}
            for g, p, t in (("standard", "a", 1.0), ("standard", "b", 3.0), ("unseen", "unseen_c", 7.0))]
    summary = summarise(rows)
    assert [(s["group"], s["pairs"], s["tre_mean_mm"]) for s in summary] == [("standard", 2, 2.0), ("unseen", 1, 7.0)]
    text = markdown(summary, {"cpu": "x"}, [])
    assert text.index("## standard pairs") < text.index("| m | 2 | 2.00") < text.index("## unseen pairs") \
        < text.index("| m | 1 | 7.00")


def test_tre_vs_time_figure_has_a_log_panel_per_group_and_one_colour_per_method():
    import matplotlib.pyplot as plt

    summary = [{"group": group, "method": method, "tre_mean_mm": tre, "process_s": seconds}
               for group, method, tre, seconds in (("standard", "identity", 6.5, 2.0), ("standard", "udrnet", 0.3, 8.0),
                                                   ("unseen", "identity", 40.0, 2.1), ("unseen", "udrnet", 0.4, 7.0),
                                                   ("unseen", "elastix", float("nan"), 70.0))]
    figure = tables.tre_vs_time_figure(summary)
    panels = figure.axes
    assert [axes.get_title() for axes in panels] == ["standard pairs", "unseen pairs"]
    assert all(axes.get_xscale() == axes.get_yscale() == "log" for axes in panels)
    for axes, group in zip(panels, ("standard", "unseen")):
        points = np.concatenate([collection.get_offsets() for collection in axes.collections])
        expected = [(e["process_s"], e["tre_mean_mm"]) for e in summary if e["group"] == group
                    and not np.isnan(e["tre_mean_mm"])]  # a method without a TRE is left out
        np.testing.assert_allclose(points, expected)
    colours = [{tuple(c.get_facecolor()[0]) for c in axes.collections} for axes in panels]
    assert colours[0] == colours[1] and len(colours[0]) == 2  # a method has the same colour in both panels
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["identity", "udrnet"]
    plt.close(figure)
