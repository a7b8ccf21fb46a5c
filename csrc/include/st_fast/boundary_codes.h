// The integer codes that cross the Python/C++ boundary, by name: both extensions export them as the module attribute
// `boundary_codes` ({"SegmentKind": {"OWN_POSITIVE": 0, ...}, ...}). st_fast/_native.py defines the same codes as IntEnums,
// refuses an extension whose codes disagree (a build from other sources) and tests/test_native.py checks them, so a
// code changed on one side only fails at import and in the tests instead of silently mixing up segments or dtypes.
#pragma once

#include <pybind11/pybind11.h>

#include <initializer_list>
#include <utility>

#include "st_fast/row_kernel_args.h"
#include "st_fast/half_store.h"

namespace st_fast {

inline pybind11::dict boundary_codes() {
  auto table = [](std::initializer_list<std::pair<const char*, int>> entries) {
    pybind11::dict codes;
    for (const auto& [name, code] : entries) codes[name] = code;
    return codes;
  };
  pybind11::dict out;
  out["SegmentKind"] = table({{"OWN_POSITIVE", kOwnPositive},
                                {"OWN_MASKED", kOwnMasked},
                                {"PLAIN", kPlain},
                                {"OWN_GROUP_MASKED", kOwnGroupMasked}});
  out["HardnessKind"] = table({{"NONE", kHardnessNone}, {"IN_BATCH", kInBatch}, {"HARD", kHard}, {"ALL", kAll}});
  out["StoreDtype"] = table({{"FP32", kStoreFp32}, {"BF16", kStoreBf16}, {"FP16", kStoreFp16}});
  return out;
}

}  // namespace st_fast
