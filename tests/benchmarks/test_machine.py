"""The machine record: flags beside every figure, and the measured peaks per dtype and kernel."""

from benchmarks.machine import flags_line, machine_info, measure_peaks


def test_machine_record_says_whether_the_cpu_has_amx():
    info = machine_info("cpu")
    assert isinstance(info["amx"], bool) and info["auto_dtype"].startswith("CPU")
    line = flags_line(info)
    assert ("no AMX" in line) != info["amx"] and info["torch_cpu_capability"] in line
    assert flags_line({"cpu": "X", "usable_cores": 4, "torch_cpu_capability": "AVX512", "amx": True}) == (
        "X, 4 cores, AVX512, AMX"
    )


def test_peaks_per_dtype_and_kernel():
    peaks = measure_peaks("cpu", ["float32"], matmul_n=64, conv_shapes=[(16, 8), (32, 4)], repeats=1)
    assert peaks["matmul"]["float32"] == max(peaks["matmul_kernels"]["float32"].values()) > 0
    assert set(peaks["conv_shapes"]["float32"]) == {"16ch 8²", "32ch 4²"}
    assert peaks["conv"]["float32"] == max(peaks["conv_shapes"]["float32"].values()) > 0
