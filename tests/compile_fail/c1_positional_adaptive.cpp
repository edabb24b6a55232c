// Rule C1: an adaptive budget compares scores across heads; positional scores cannot be.
// expected-diagnostic: static assertion failed.*kvtrim::policy rule C1
#include "kvtrim/kvtrim.hpp"

kvtrim::policy<kvtrim::positional, kvtrim::adaptive_budget<>, kvtrim::topk_evictor> bad_policy;
