// K-type quantizers (Q2_K..Q6_K), following ggml's reference quantize_row_*_ref.
// Placeholder until the faithful port lands: every entry point refuses clearly.
#include <stdexcept>
#include "../quantize.h"

namespace lowtune {
static void not_yet(const char* t) {
  throw std::runtime_error(std::string("quantizing to ") + t + " is not implemented yet");
}
void quantize_row_q2_K(const float*, void*, int64_t) { not_yet("Q2_K"); }
void quantize_row_q3_K(const float*, void*, int64_t) { not_yet("Q3_K"); }
void quantize_row_q4_K(const float*, void*, int64_t) { not_yet("Q4_K"); }
void quantize_row_q5_K(const float*, void*, int64_t) { not_yet("Q5_K"); }
void quantize_row_q6_K(const float*, void*, int64_t) { not_yet("Q6_K"); }
}  // namespace lowtune
