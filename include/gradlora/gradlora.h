#pragma once
/// \file gradlora.h
/// Umbrella header of gradlora: low-rank training from the optimizer side.

#include <gradlora/config.h>
#include <gradlora/inner_rule.h>
#include <gradlora/maths.h>
#include <gradlora/method.h>
#include <gradlora/optimizer.h>
#include <gradlora/projector.h>
