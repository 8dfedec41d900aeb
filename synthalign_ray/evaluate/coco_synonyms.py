"""A small COCO object synonym table for CHAIR, in the format of CHAIR's data/synonyms.txt
(LisaAnne/Hallucination): one line per COCO category, its name first, then words that mean it.

It covers all 80 categories with common synonyms, written for this package; CHAIR's own table is
longer (hundreds of words: breeds, vehicle kinds, ...). For numbers comparable with papers pass the
full file: `ChairVocabulary.from_table(parse_synonyms(Path("synonyms.txt").read_text()))`, or
`chair.synonyms: PATH` in an evaluation config.
"""

COCO_SYNONYMS = """\
person, girl, boy, man, woman, kid, child, people, adult, rider, baby, player, lady, guy, skier, surfer, skateboarder, pedestrian
bicycle, bike, cycle
car, automobile, van, taxi, suv, sedan
motorcycle, motorbike, motor bike, motor cycle, scooter
airplane, plane, jet, aircraft, jetliner, air plane, airliner
bus, minibus, trolley
train, locomotive, tram, subway
truck, pickup, lorry
boat, ship, kayak, canoe, sailboat, yacht, ferry
traffic light, street light, traffic signal, stop light
fire hydrant, hydrant
stop sign
parking meter, meter
bench
bird, pigeon, seagull, duck, parrot, owl, eagle, goose
cat, kitten, kitty
dog, puppy, pup
horse, pony, foal
sheep, lamb, ram
cow, cattle, calf, bull, ox
elephant
bear, cub
zebra
giraffe
backpack, knapsack
umbrella, parasol
handbag, purse, bag
tie, necktie, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball, football, baseball, basketball, soccer ball
kite
baseball bat, bat
baseball glove, glove, mitt
skateboard
surfboard, board
tennis racket, racket, racquet
bottle
wine glass
cup, mug
fork
knife
spoon
bowl
banana
apple
sandwich, burger, sub
orange
broccoli
carrot
hot dog
pizza
donut, doughnut
cake, cupcake
chair, stool, seat
couch, sofa
potted plant, plant, houseplant
bed
dining table, table, desk
toilet, urinal
tv, television, monitor, screen
laptop, laptop computer, computer, notebook
mouse
remote, controller
keyboard
cell phone, phone, cellphone, smartphone, mobile phone
microwave
oven, stove, stove top oven
toaster
sink
refrigerator, fridge, freezer
book, novel
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer, hair dryer, blow dryer
toothbrush
"""
