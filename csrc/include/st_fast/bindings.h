// Each csrc/*.cpp unit of the `st_fast._C` extension registers its functions through one bind_* hook.
#pragma once

#include <pybind11/pybind11.h>

namespace st_fast {
void bind_half_store(pybind11::module_& m);
void bind_contrastive_row(pybind11::module_& m);
void bind_sampler(pybind11::module_& m);
}  // namespace st_fast
