// Calibration for activation scales: run the unquantized model over sample token sequences and record,
// for every linear layer, the largest |input| it saw.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/model.h"

namespace nibble {

// Returns amax of each linear module's input (keyed by module name) over all samples.
std::map<std::string, float> calibrate_input_amax(Model& model, const std::vector<std::vector<int32_t>>& samples);

}  // namespace nibble
